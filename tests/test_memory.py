"""asfda.memory.release_freed_memory: glibc's ``malloc_trim(0)`` where the C library has it, nothing elsewhere."""

from __future__ import annotations

import platform

import pytest

import asfda.memory as memory


def test_release_freed_memory_calls_malloc_trim_with_zero_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda *args: calls.append(args))
    memory.release_freed_memory()
    memory.release_freed_memory()
    assert calls == [(0,), (0,)]


def test_release_freed_memory_is_a_no_op_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: looked_up.append(1))  # the lookup finds nothing: None
    memory.release_freed_memory()  # does not call the missing function
    assert looked_up == [1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_is_found_on_glibc_and_returns_freed_pages() -> None:
    trim = memory._malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was released, 0: there was none to release
    memory.release_freed_memory()
