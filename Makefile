# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is pinned here: a looser spec pulls several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-slow lint setup setup-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

# the pin again: nnunetv2 (test extra) pulls timm -> torchvision, whose newest release wants a newer torch
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,dicom,bundle]' $(TORCH_PIN)
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/asfda demo

test: setup-test
	$(PY) -m pytest

test-slow: setup-test
	$(PY) -m pytest -m slow

# ruff (pyflakes, pycodestyle, bugbear, pyupgrade, import order) on src/, benchmarks/ and tests/, and mypy on the
# trees its files list in pyproject.toml names; both configured there
lint: setup-test
	$(VENV)/bin/ruff check src benchmarks tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .cache
