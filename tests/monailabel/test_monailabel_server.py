"""asfda's MONAI Label app behind a real ``monailabel start_server`` on a free loopback port, driven through the REST
calls the 3D Slicer plugin makes (its client's selectors and multipart encoding): Next Sample, Submit Label, Train,
Run (infer). The next sample must be ``asfda query``'s pick on the same pool and model.

Slow, and skipped where MONAI Label is not installed: it runs the ``monailabel`` of the virtual environment named by
``ASFDA_MONAILABEL_VENV`` (else this interpreter's, else /work/venv_ml). Set-up: see README, "Using asfda from 3D
Slicer (MONAI Label)". ``ASFDA_MONAILABEL_TRANSCRIPT=FILE`` keeps the REST exchange (request lines, trimmed answers).
"""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import cast
from urllib.parse import quote_plus

import numpy as np
import pytest

from _monailabel_helpers import AFFINE, app_settings, write_studies
from asfda.monailabel import STRATEGY_NAMES, AppBackend, write_app
from asfda.project import Project
from asfda.query import query_dataset
from conftest import load_nifti, write_bundle, write_nifti

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


def _monailabel_venv() -> Path | None:
    given = os.environ.get("ASFDA_MONAILABEL_VENV")
    for venv in ([Path(given)] if given else [Path(sys.prefix), Path("/work/venv_ml")]):
        if (venv / "bin" / "monailabel").is_file() and (venv / "bin" / "python").exists():
            return venv
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Client:
    """The Slicer plugin's requests (MONAILabelClient: JSON bodies, its multipart form encoding), with a transcript."""

    BOUNDARY = "----------lImIt_of_THE_fIle_eW_$"

    def __init__(self, port: int) -> None:
        self.port = port
        self.transcript: list[str] = []

    def call(self, method: str, selector: str, body: dict | None = None, fields: dict | None = None,
             files: dict | None = None, timeout: float = 300, show=None) -> tuple[int, object]:
        """``show``: what of the answer the transcript keeps (default: all of it, trimmed)."""
        headers: dict[str, str] = {}
        data: bytes | None = None
        if fields is not None or files:
            data = self._multipart(fields or {}, files or {})
            headers["content-type"] = f"multipart/form-data; boundary={self.BOUNDARY}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if data is not None:
            headers["content-length"] = str(len(data))
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        conn.request(method, selector, body=data, headers=headers)
        resp = conn.getresponse()
        raw, ctype = resp.read(), resp.getheader("content-type", "")
        conn.close()
        answer: object = self._multipart_answer(raw, ctype) if "multipart" in ctype else _json_or_text(raw)
        sent = "" if body is None else f" {json.dumps(body)}"
        if fields is not None or files:
            sent = f" form {json.dumps(fields or {})} files {sorted(files or {})}"
        shown = json.dumps(show(answer) if show else answer, default=lambda b: f"<{len(b)} bytes>")
        self.transcript.append(f"> {method} {selector}{sent}\n< {resp.status} {shown[:700]}"
                               f"{' ...' if len(shown) > 700 else ''}")
        return resp.status, answer

    def _multipart(self, fields: dict, files: dict) -> bytes:
        lines: list[bytes] = []
        for key, value in fields.items():
            lines += [f"--{self.BOUNDARY}".encode(), f'Content-Disposition: form-data; name="{key}"'.encode(), b"",
                      value.encode()]
        for key, path in files.items():
            lines += [f"--{self.BOUNDARY}".encode(),
                      f'Content-Disposition: form-data; name="{key}"; filename="{Path(path).name}"'.encode(),
                      b"Content-Type: application/octet-stream", b"", Path(path).read_bytes()]
        lines += [f"--{self.BOUNDARY}--".encode(), b""]
        return b"\r\n".join(lines)

    @staticmethod
    def _multipart_answer(raw: bytes, ctype: str) -> dict:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        out: dict = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            out[name] = {"file": part.get_filename(), "bytes": payload} if part.get_filename() else \
                json.loads(cast(bytes, payload))
        return out


def _json_or_text(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]


@pytest.fixture
def server(tmp_path: Path):
    venv = _monailabel_venv()
    if venv is None:
        pytest.skip("MONAI Label is not installed (set ASFDA_MONAILABEL_VENV to a venv with monailabel and asfda)")
    studies, truth = write_studies(tmp_path)
    model = write_bundle(tmp_path / "bundle")
    app = write_app(tmp_path / "app", model, settings=app_settings())
    port = _free_port()
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(venv), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(venv / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies",
                             str(studies), "--host", HOST, "--port", str(port), "--conf", "device", "cpu"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(port)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                up = client.call("GET", "/info/")[0] == 200
                client.transcript.clear()  # the test's own calls make the transcript
                if up:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer in 240 s: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"client": client, "app": app, "studies": studies, "truth": truth, "model": model, "root": tmp_path}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        keep = os.environ.get("ASFDA_MONAILABEL_TRANSCRIPT")
        if keep and client.transcript:
            Path(keep).write_text("\n\n".join(client.transcript) + "\n")


def test_slicer_rest_calls_against_a_real_monailabel_server(server: dict) -> None:
    c, studies, root = server["client"], server["studies"], server["root"]
    status, info = c.call("GET", "/info/")
    assert status == 200 and sorted(info["strategies"]) == sorted(STRATEGY_NAMES)
    assert list(info["models"]) == ["asfda"] and list(info["trainers"]) == ["asfda"]
    assert info["labels"] == {"liver": 1, "spleen": 2}

    # Next Sample: asfda query's pick on the same pool and model, for each strategy
    picks = {}
    for strategy in STRATEGY_NAMES:
        status, answer = c.call("POST", f"/activelearning/{strategy}", body={"client_id": "slicer"})
        assert status == 200, answer
        expected = query_dataset(server["model"], studies, strategy, 1, root / f"query_{strategy}.json",
                                 device="cpu", progress=False, cache_dir=None)
        assert expected is not None
        assert answer["id"] == expected.ids[0], (strategy, answer, expected)
        assert answer["asfda"]["strategy"] == strategy and answer["path"].endswith(f"{answer['id']}.nii.gz")
        picks[strategy] = answer["id"]
    first = picks["asfda"]

    # Submit Label: a label on another grid is refused with its reason, the true one is kept
    bad = write_nifti(root / "bad" / f"{first}.nii.gz", np.zeros((5, 5, 5), np.uint8), AFFINE)
    status, answer = c.call("PUT", f"/datastore/label?image={quote_plus(first)}&tag=final",
                            fields={"params": json.dumps({"client_id": "slicer"})}, files={"label": bad})
    assert status == 422 and "differs from the image's" in answer["detail"]
    assert not (studies / "labels" / "final" / f"{first}.nii.gz").exists()
    status, answer = c.call("PUT", f"/datastore/label?image={quote_plus(first)}&tag=final",
                            fields={"params": json.dumps({"client_id": "slicer"})},
                            files={"label": server["truth"] / f"{first}.nii.gz"})
    assert status == 200 and answer["label"] == first

    # the next Next Sample ingests it (as `asfda ingest` does) and picks another image
    status, answer = c.call("POST", "/activelearning/asfda", body={"client_id": "slicer"})
    assert status == 200 and answer["id"] != first and answer["asfda"]["labels"]["accepted"] == [first]
    second = answer["id"]

    # Train: one asfda round in MONAI Label's training subprocess
    status, answer = c.call("POST", "/train/asfda", body={})
    assert status == 200 and answer["status"] in ("SUBMITTED", "RUNNING", "DONE"), answer
    deadline = time.monotonic() + 400
    while True:
        time.sleep(3)
        status, answer = c.call("GET", "/train/")
        c.transcript.pop()  # the polls: only the last one is kept
        if answer.get("status") in ("DONE", "ERROR", "STOPPED") or time.monotonic() > deadline:
            break
    status, answer = c.call("GET", "/train/", show=lambda a: {**a, "details": [
        line[line.find("asfda"):] for line in a.get("details", []) if "asfda round:" in line or "asfda:" in line]})
    assert answer["status"] == "DONE", "\n".join(answer.get("details", []))
    assert any("asfda round: {'round': 0" in line for line in answer["details"]), answer["details"]
    state = Project(server["app"] / "project").state
    assert [r["labelled_ids"] for r in state["rounds"]] == [[first]] and state["weights"].endswith(".safetensors")

    # Run (infer): the current adapted model's label map on the image's grid
    status, answer = c.call("POST", f"/infer/asfda?image={quote_plus(second)}", fields={"params": "{}"})
    assert status == 200 and answer["params"]["weights"] == state["weights"], answer
    (root / "served.nii.gz").write_bytes(answer["image"]["bytes"])
    served = load_nifti(root / "served.nii.gz")
    image = load_nifti(studies / f"{second}.nii.gz")
    assert served.shape == image.shape and np.allclose(served.affine, image.affine)
    AppBackend(server["app"], studies).infer(studies / f"{second}.nii.gz", root / "here.nii.gz")
    assert np.array_equal(served.get_fdata(), load_nifti(root / "here.nii.gz").get_fdata())
    status, info = c.call("GET", "/info/")
    assert info["train_stats"]["asfda"]["rounds"] == 1
