from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asfda.cli import build_parser, main
from asfda.errors import AsfdaError

SUBCOMMANDS = ["demo", "phantom", "simulate", "evaluate", "predict", "score", "query", "init", "next", "ingest",
               "finetune", "status", "set", "monailabel-app"]


def test_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_query_help_names_the_package_default_diversity(capsys: pytest.CaptureFixture) -> None:
    from asfda.selection import DEFAULT_DIVERSITY

    with pytest.raises(SystemExit):
        main(["query", "--help"])
    assert f"(default: {DEFAULT_DIVERSITY})" in " ".join(capsys.readouterr().out.split())


def test_parser_knows_every_subcommand() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(SUBCOMMANDS) <= set(actions[0].choices or ())


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "asfda.cli", "evaluate", "--model", str(tmp_path / "nope"),
                           "--data", str(tmp_path / "ds")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nope") in lines[0]


def test_missing_dataset_json_via_cli(tmp_path: Path, tiny_bundle: Path) -> None:
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    code = main(["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path / "ds"), "--no-progress"])
    assert code == 2


def test_unknown_config_key_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\npool: p\nbudgte: 3\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "budgte" in err and "budget" in err


def test_guard_settings_reach_the_run_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from asfda.config import load_config

    assert load_config(None, {"train.guard": False}).train.guard is False
    assert load_config(None, {}).train.guard is True  # on by default
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\npool: p\ntrain:\n  guard_volumes: 0\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    assert "train.guard_volumes" in capsys.readouterr().err


STRATEGY_COMMANDS = [("query", "--strategy"), ("init", "--strategy"), ("score", "--strategies"),
                     ("simulate", "--strategies")]


@pytest.mark.parametrize(("name", "flag"), STRATEGY_COMMANDS)
def test_help_lists_the_strategy_names_from_the_registry(name: str, flag: str, capsys: pytest.CaptureFixture) -> None:
    from asfda.selection import STRATEGIES

    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    help_of_flag = out[out.index(flag, out.index("options:")):]
    for strategy in STRATEGIES:
        assert strategy in help_of_flag.split("--", 2)[1], (strategy, help_of_flag[:300])


@pytest.mark.parametrize(("name", "flag"), STRATEGY_COMMANDS)
def test_an_unknown_strategy_is_refused_with_the_list(name: str, flag: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from asfda.selection import STRATEGIES

    argv = {"query": ["query", "--model", "m", "--data", "d", "--budget", "1"],
            "init": ["init", str(tmp_path / "p"), "--model", "m", "--pool", "d"],
            "score": ["score", "--model", "m", "--data", "d"],
            "simulate": ["simulate", "--model", "m", "--pool", "d"]}[name]
    value = "asfda,entropyy" if flag == "--strategies" else "entropyy"
    with pytest.raises(SystemExit) as e:
        main([*argv, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "entropyy" in err and all(s in err for s in STRATEGIES)


def test_strategy_names_are_case_insensitive_as_before() -> None:
    args = build_parser().parse_args(["query", "--model", "m", "--data", "d", "--budget", "1", "--strategy", "ASFDA"])
    assert args.strategy == "asfda"
    args = build_parser().parse_args(["score", "--model", "m", "--data", "d", "--strategies", " Random, enpy "])
    assert args.strategies == ["random", "enpy"]


MODEL_COMMANDS = ["evaluate", "predict", "score", "query", "simulate", "init"]
TRUST_HELP = ("build the model config with MONAI's full ConfigParser (runs $ expressions and any _target_): only for "
              "bundles you trust")


@pytest.mark.parametrize("name", MODEL_COMMANDS)
@pytest.mark.parametrize("trust", [False, True])
def test_trust_model_code_reaches_load_model(name: str, trust: bool, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from asfda.errors import AsfdaError
    from conftest import write_bundle, write_nnunet

    seen: list[bool] = []

    def fake_load_model(*args, allow_code: bool = False, **kwargs):
        seen.append(allow_code)
        raise AsfdaError("stop here")

    for where in ("asfda.predict.load_model", "asfda.query.load_model", "asfda.simulate.load_model",
                  "asfda.evaluate.load_model", "asfda.project.setup.load_model", "asfda.project.state.load_model",
                  "asfda.models.load_model"):  # the package last: a module imported by the patching binds the real one
        monkeypatch.setattr(where, fake_load_model)
    data, model, out = write_nnunet(tmp_path / "ds", n=4), write_bundle(tmp_path / "bundle"), tmp_path / "out"
    argv = {"evaluate": ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out)],
            "predict": ["predict", "--model", str(model), "--images", str(data), "--out", str(out)],
            "score": ["score", "--model", str(model), "--data", str(data), "--out", str(out / "s.csv")],
            "query": ["query", "--model", str(model), "--data", str(data), "--budget", "1",
                      "--out", str(out / "q.json")],
            "simulate": ["simulate", "--model", str(model), "--pool", str(data), "--out", str(out)],
            "init": ["init", str(out), "--model", str(model), "--pool", str(data)]}[name]
    assert main([*argv, *(["--trust-model-code"] if trust else []), "--no-progress"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == [trust]
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert TRUST_HELP in " ".join(capsys.readouterr().out.split())


# a project does not remember --trust-model-code (issue 30): tests/project/test_project_hostile.py


def test_python_dash_m_asfda_runs_the_cli() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "asfda", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("asfda ")


def test_no_command_is_an_error_not_a_silent_success(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "name a command" in err and "predict" in err


def test_predict_takes_data_like_every_other_command() -> None:
    from asfda.cli import build_parser

    args = build_parser().parse_args(["predict", "--model", "m", "--data", "d", "--out", "o"])
    assert args.images == "d"
    assert build_parser().parse_args(["predict", "--model", "m", "--images", "d", "--out", "o"]).images == "d"


def test_ingest_of_an_empty_folder_says_so(tmp_path, tiny_bundle, tiny_dataset, capsys: pytest.CaptureFixture) -> None:
    from asfda.project import ProjectSettings, init_project

    init_project(tmp_path / "p", str(tiny_bundle), str(tiny_dataset), ProjectSettings(budget=1))
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty"), str(tmp_path / "p")]) == 2
    assert "nothing ingested" in capsys.readouterr().err


ALL_MODEL_COMMANDS = ("evaluate", "predict", "score", "query", "simulate", "init", "next", "finetune")
TAKES_DATA = ("evaluate", "predict", "score", "query", "simulate", "init")  # next and finetune: the project's pool
FINE_TUNES = ("simulate", "init", "finetune")  # --precision is the fine-tuning precision (init keeps it)


@pytest.mark.parametrize("command", ALL_MODEL_COMMANDS)
def test_every_model_running_command_takes_data_device_and_precision(command: str) -> None:
    """One name per concept: --data (simulate and init: also --pool; predict: also --images) wherever a command reads
    a dataset, --device and --precision wherever a model runs (the fine-tuning precision where one is fine-tuned, else
    the inference precision), --trust-model-code wherever a model file is loaded."""
    from asfda.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    flags = {o for a in sub.choices[command]._actions for o in a.option_strings}
    assert "--device" in flags
    assert ("--data" in flags) is (command in TAKES_DATA)
    assert "--precision" in flags
    help_text = next(a.help for a in sub.choices[command]._actions if "--precision" in a.option_strings)
    assert help_text.startswith("fine-tuning precision" if command in FINE_TUNES else "inference precision")
    assert "--trust-model-code" in flags  # a project does not keep it: next and finetune take it each time


@pytest.mark.parametrize("argv, dest, value", [
    (["next", "p", "--device", "cpu"], "device", "cpu"),
    (["finetune", "p", "--device", "cuda:1", "--precision", "bf16"], "precision", "bf16"),
    (["simulate", "--data", "d"], "pool", "d"),
    (["init", "o", "--model", "m", "--data", "d"], "pool", "d"),
    (["predict", "--model", "m", "--images", "d", "--out", "o"], "images", "d"),
])
def test_the_flags_parse_where_they_are_offered(argv: list[str], dest: str, value: str) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_project_commands_pass_device_and_precision_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asfda.project as prj

    seen: dict[str, Any] = {}
    monkeypatch.setattr(prj, "next_query", lambda root, **kw: seen.setdefault("next", kw) and 1 / 0)
    monkeypatch.setattr(prj, "finetune_project", lambda root, **kw: seen.setdefault("finetune", kw) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["next", str(tmp_path), "--device", "cpu", "--debug"])
    with pytest.raises(ZeroDivisionError):
        main(["finetune", str(tmp_path), "--device", "cpu", "--precision", "bf16", "--debug"])
    assert seen["next"]["device"] == "cpu" and seen["finetune"]["precision"] == "bf16"
    assert seen["finetune"]["device"] == "cpu"


def test_simulate_device_and_precision_reach_the_run_config(monkeypatch, tmp_path) -> None:
    import asfda.simulate

    seen: dict[str, Any] = {}
    monkeypatch.setattr(asfda.simulate, "run_simulation", lambda cfg: seen.setdefault("cfg", cfg) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["simulate", "--model", "m", "--pool", "p", "--device", "cpu", "--precision", "bf16", "--debug"])
    assert seen["cfg"].device == "cpu" and seen["cfg"].train.precision == "bf16"


@pytest.mark.parametrize("argv, target", [
    (["evaluate", "--model", "m", "--data", "d"], "asfda.evaluate.evaluate_model"),
    (["predict", "--model", "m", "--data", "d", "--out", "o"], "asfda.predict.predict_model"),
    (["score", "--model", "m", "--data", "d"], "asfda.query.score_dataset"),
    (["query", "--model", "m", "--data", "d", "--budget", "1"], "asfda.query.query_dataset"),
    (["next", "p"], "asfda.project.next_query"),
])
def test_inference_commands_pass_precision_and_device_on(argv: list[str], target: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module, name = target.rsplit(".", 1)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: seen.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([*argv, "--device", "cpu", "--precision", "bf16", "--debug"])
    assert seen["precision"] == "bf16" and seen["device"] == "cpu"
    seen.clear()
    with pytest.raises(ZeroDivisionError):
        main([*argv, "--debug"])
    assert seen["precision"] in ("fp32", None)  # the default: full precision


def test_evaluate_in_bf16_runs_end_to_end_and_records_its_precision(tmp_path: Path, tiny_bundle: Path,
                                                                   tiny_dataset: Path) -> None:
    import json

    for precision in ("fp32", "bf16"):
        assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(tiny_dataset), "--out",
                     str(tmp_path / precision), "--precision", precision, "--no-progress"]) == 0
    fp32, bf16 = (json.loads((tmp_path / p / "summary.json").read_text()) for p in ("fp32", "bf16"))
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert abs(fp32["mean"]["dice_mean"] - bf16["mean"]["dice_mean"]) < 0.05


# ---------------------------------------------------------------------------------------------- parse-time checks
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-0.1", "1.5", "half"])
def test_query_alpha_outside_0_1_is_refused_when_parsed(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["query", "--model", "m", "--data", "d", "--budget", "1", f"--alpha={value}"])
    assert exc.value.code == 2 and "--alpha" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["evil", "gpu", "cuda:", "cuda:x", "CPU", "cpu:0", ""])
def test_a_device_name_that_is_none_of_the_forms_is_refused_when_parsed(value: str,
                                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "m", "--data", "d", "--out", "o", f"--device={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "auto, cpu, cuda, cuda:N" in err and "mps" in err and "Traceback" not in err


def test_the_device_forms_parse_and_select_device_names_what_is_missing() -> None:
    import torch

    from asfda.cli import build_parser
    from asfda.engine import select_device

    parser = build_parser()
    for value in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert parser.parse_args(["query", "--model", "m", "--data", "d", "--budget", "1", "--device", value,
                                  "--alpha", "1"]).device == value
    assert select_device("cpu") == torch.device("cpu") and select_device(None).type in ("cpu", "cuda")
    with pytest.raises(AsfdaError, match="auto, cpu, cuda"):
        select_device("evil")
    if not torch.cuda.is_available():
        with pytest.raises(AsfdaError, match="CUDA is not available"):
            select_device("cuda:0")
    else:
        with pytest.raises(AsfdaError, match="CUDA device"):
            select_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(AsfdaError, match="MPS"):
            select_device("mps")
