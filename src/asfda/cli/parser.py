"""The command line's arguments: `build_parser` and the flag helpers the commands share. Nothing heavy is imported
here (the strategy registry only when a strategy is given or help is printed)."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]


def _device(text: str) -> str:
    """--device: one of `asfda.engine.DEVICE_FORMS` (whether this machine has it is checked when the model loads)."""
    from asfda.engine import check_device_name
    from asfda.errors import AsfdaError

    try:
        return check_device_name(text)
    except AsfdaError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def _alpha(text: str) -> float:
    """--alpha: a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", type=_device, default=default, help="auto (CUDA when available), cpu, cuda, cuda:N, "
                   f"mps (default: {default or 'the config file, else auto'})")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fine-tuning precision: fp32, or bf16 autocast (faster on CPUs with bf16 instructions and on "
                   "GPUs) (default: the config's, fp32); inference stays fp32 so that every figure compares")


def _add_inference_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="inference precision: fp32, or bf16 autocast of each window's forward (faster on CPUs with "
                   "bf16 instructions and on GPUs; windows blended in fp32) (default: fp32)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


TRUST_MODEL_CODE_HELP = ("build the model config with MONAI's full ConfigParser (runs $ expressions and any _target_): "
                         "only for bundles you trust; also needed to load a TorchScript model (a program, refused "
                         "without it). Given here only: a config file cannot grant it")


def _add_trust(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_MODEL_CODE_HELP + extra)


def _add_output_activation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-activation", choices=["softmax", "sigmoid", "none"], default=None,
                   help="what turns the network's output into probabilities: softmax, sigmoid, or none for a network "
                   "that already outputs probabilities (no second softmax) (default: what the model declares: "
                   "asfda_output_activation in its config, its metadata, its postprocessing; else softmax)")


def _add_model_flags(p: argparse.ArgumentParser, *, fine_tunes: bool = False, device_default: str | None = "auto",
                     trust_extra: str = "") -> None:
    """The flags of every command that loads and runs a model: --device, --precision (the fine-tuning precision where
    the command fine-tunes, else the inference precision), --trust-model-code, --output-activation, and the common
    ones."""
    _add_device(p, default=device_default)
    (_add_precision if fine_tunes else _add_inference_precision)(p)
    _add_trust(p, trust_extra)
    _add_output_activation(p)
    _add_common(p)



class _StrategyNames:
    """The strategy registry (`asfda.selection.STRATEGIES`) as argparse ``choices``, imported only when a strategy
    is given or help is printed (the registry pulls in torch). A list of names is "in" it when every name is."""

    @staticmethod
    def _names() -> list[str]:
        from asfda.selection import STRATEGIES

        return sorted(STRATEGIES)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, value: object) -> bool:
        values = value if isinstance(value, list) else [value]
        return all(v in self._names() for v in values)


STRATEGY_NAMES = _StrategyNames()


def _strategy_name(text: str) -> str:
    return text.strip().lower()


def _strategy_list(text: str) -> list[str]:
    """Comma-separated strategy names, each checked against the registry."""
    names = [_strategy_name(n) for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no strategy names in {text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(map(repr, unknown))}; choose from "
                                         f"{', '.join(STRATEGY_NAMES)}")
    return names


def _add_strategy(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--strategy", default="asfda", type=_strategy_name, choices=STRATEGY_NAMES, metavar="NAME",
                   help=f"{what}: one of %(choices)s (default: asfda)")


def _add_strategies(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--strategies", type=_strategy_list, choices=STRATEGY_NAMES, metavar="NAMES",
                   help=f"comma-separated strategy names among %(choices)s; {what}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def _seed(text: str) -> int:
    """--seed, --fold-seed: a whole number in [0, `asfda.config.SEED_MAX`]."""
    from asfda.config import SEED_MAX, seed_ok

    try:
        value: object = int(text)
    except ValueError:
        value = None
    if not seed_ok(value):
        raise argparse.ArgumentTypeError(f"a seed is a whole number in [0, {SEED_MAX}], got {text!r}")
    assert isinstance(value, int)
    return value


def _seed_list(text: str) -> list[int]:
    """--random-seeds: comma-separated seeds."""
    return [_seed(x) for x in text.split(",") if x.strip()]


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"KEY=VALUE expected, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    from asfda import __version__

    parser = argparse.ArgumentParser(
        prog="asfda", description="Adapt a pretrained 3D segmentation model to a new domain with few annotations: "
        "choose which scans to label, fine-tune on them, measure.")
    parser.add_argument("--version", action="version", version=f"asfda {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole loop on the embedded phantom benchmark (asfda vs random)")
    p.add_argument("--out", default="runs/demo", help="results folder (default: runs/demo)")
    p.add_argument("--data", default=".cache/phantom", help="where the phantom data is generated and cached")
    p.add_argument("--seed", type=_seed, default=0)
    _add_common(p)

    p = sub.add_parser("phantom", help="write the two-domain phantom benchmark (nnU-Net raw datasets)")
    p.add_argument("out", help="output folder (gets source/ and target/)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--n-source", type=int, default=24)
    p.add_argument("--n-target", type=int, default=40)
    p.add_argument("--n-misleading", type=int, default=0,
                   help="extra target cases of the misleading sub-population (cystic livers, modelled on the real "
                        "pool's outlier: atypical, and harmful when learned alone); appended after the others")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)

    p = sub.add_parser("simulate", help="simulate strategies x budgets x seeds with labels from the dataset")
    p.add_argument("--config", help="YAML run config (see docs); flags below override it")
    p.add_argument("--model", help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--pool", "--data", dest="pool",
                   help="labelled dataset used as the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--test", help="separate labelled test dataset (default: a seeded split of the pool)")
    _add_strategies(p, "each runs with the same seeds and recipe (default: asfda,random)")
    p.add_argument("--budget", type=int, help="volumes labelled per round")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="fine-tuning steps per round")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--no-upper-bound", action="store_true", help="skip the full-pool upper bound")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights (no non-regression guard)")
    p.add_argument("--upper-bound-steps", type=int, help="steps of the upper bound (default: steps x rounds)")
    p.add_argument("--out", help="results folder (not inside the pool, the test set or the model)")
    _add_model_flags(p, fine_tunes=True, device_default=None)

    p = sub.add_parser("crossval", help="K-fold cross-validation on a labelled dataset: every volume tested once, "
                       "each strategy against random with 95%% bootstrap intervals (summary.json, README.md, "
                       "report.html)")
    p.add_argument("--model", help="bundle folder, checkpoint or TorchScript file (not needed with --summarize-only)")
    p.add_argument("--data", required=True, help="the labelled dataset (nnU-Net raw or NIfTI folder); fold k's pool "
                   "is every volume outside its test fold")
    p.add_argument("--out", required=True, help="results folder: folds.json, fold<k>/ (simulate's files), "
                   "summary.json, README.md, report.html; rerun the same command to resume")
    p.add_argument("--folds", type=int, default=5, help="K (default: 5); the folds' sizes differ by at most one")
    p.add_argument("--fold-seed", type=_seed, default=0, help="seeds the fold assignment (default: 0)")
    p.add_argument("--config", help="YAML run config: the recipe of every fold (as simulate's); flags override it")
    p.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE", help="one run-config setting, "
                   "e.g. --set representativeness=density --set train.hold_back_discarded=true (repeatable)")
    _add_strategies(p, "each compared with random, which is added when missing (default: asfda,random)")
    p.add_argument("--seeds", help="comma-separated seeds of every strategy but random (default: the config's, 0)")
    p.add_argument("--random-seeds", type=_seed_list, help="random's seeds (default: --seeds continued to 3 seeds)")
    p.add_argument("--budget", type=int, help="volumes labelled per round")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="fine-tuning steps per round")
    p.add_argument("--no-upper-bound", action="store_true", help="skip the whole-pool upper bound")
    p.add_argument("--upper-bound-steps", type=int, help="steps of the upper bound, run on the first seed "
                   "(default: steps x rounds)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--cache-dir", help="prepared volumes and the folds' symlink datasets (default: the config's, "
                   ".cache)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--only-folds", type=_int_list, metavar="K,...", help="run only these folds (other processes run "
                   "the others into the same --out; on another machine, copy its fold<k> folders into --out and "
                   "--summarize-only)")
    p.add_argument("--summarize-only", action="store_true", help="run nothing: summarise the fold folders on disk")
    p.add_argument("--utility", help="a single-label utility table (benchmarks/single_label_utility.py's "
                   "utility.json): the best and the expected random first label, set beside n=1")
    _add_model_flags(p, fine_tunes=True, device_default=None)

    p = sub.add_parser("evaluate", help="Dice per case and class of a model on a labelled dataset")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="labelled dataset (nnU-Net raw or NIfTI folder)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--out", default="runs/evaluate", help="folder for per_case.csv and summary.json")
    _add_model_flags(p)

    p = sub.add_parser("predict", help="segment every image of a folder; label maps on each image's own grid")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint (preprocessing, class names "
                   "for a TorchScript file)")
    p.add_argument("--data", "--images", dest="images", required=True,
                   help="nnU-Net raw dataset (values from its dataset.json) or a folder "
                   "of NIfTI images (the model's class indices, named in OUT/labels.json); labels not needed")
    p.add_argument("--out", required=True, help="folder for CASE.nii.gz label maps (cases already done are skipped)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--largest-component", metavar="all|CLASS,...", help="cut each named class (or all) to its "
                   "largest connected component (nnU-Net's post-processing; on the cross-validated CT -> MR benchmark "
                   "it raised the mean Dice at every labelled count, but lowered single classes on the atypical "
                   "volume chaos_036 and on zero-shot predictions: benchmarks/results/recipe)")
    p.add_argument("--tta", action="store_true", help="average over flips along the model grid's A-P and S-I "
                   "axes (3 passes; never left-right)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs are up to date")
    _add_model_flags(p)

    p = sub.add_parser("score", help="score every case of a pool with the zero-shot model (per-case CSV of "
                       "every metric and component, embeddings .npy beside it)")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="the pool (nnU-Net raw or NIfTI folder; labels not needed)")
    p.add_argument("--out", default="scores.csv", help="per-case CSV (default: scores.csv); OUT-stem.embeddings.npy "
                   "and OUT-stem.json are written beside it")
    _add_strategies(p, "their needs decide the passes (default: all; MC-dropout ones are skipped for a network "
                    "without dropout)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of softmax(z / T) (default 1.0)")
    p.add_argument("--seed", type=_seed, default=0, help="seeds the MC-dropout passes")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    _add_model_flags(p)

    p = sub.add_parser("query", help="pick the next batch of cases to annotate (prints ids and score components)")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="the pool (nnU-Net raw or NIfTI folder; labels not needed)")
    _add_strategy(p, "the query strategy")
    p.add_argument("--budget", type=int, required=True, help="number of cases to pick")
    p.add_argument("--labelled", help="ids already labelled: text file (one per line), JSON list, or a previous "
                   "query.json (its labelled + ids)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--temperature", type=float, help="T of softmax(z / T) (default: fitted on the labelled cases "
                   "that have label files, else 1.0)")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="asfda: weight of the divergence rank vs ASD, in [0, 1] "
                   "(default: 0.5)")
    p.add_argument("--round0-gap", default="feature_gap", choices=["feature_gap", "norm_kl"],
                   help="asfda: first-query divergence for networks without BatchNorm statistics (default: "
                   "feature_gap, as METHOD.md specifies)")
    p.add_argument("--diversity", default=None, choices=["anatomy", "embedding", "none"],
                   help="asfda: the space of the diverse batch pick: 'anatomy', the predicted foreground composition, "
                   "'embedding', the pooled bottleneck embedding (METHOD.md's h), or 'none' (no diversity term: an "
                   "ablation) (default: embedding)")
    p.add_argument("--representativeness", default="none", choices=["none", "density", "typical"],
                   help="asfda: 'density' adds TypiClust's typicality (dense regions of the pool first), weighted "
                   "0.5 / (1 + labelled); 'typical' also leaves the least typical 0.2 / (1 + labelled) of the pool out "
                   "and caps the diversity factor, so no pick is an outlier; 'none' is METHOD.md's rule "
                   "(default: none)")
    p.add_argument("--out", default="query.json", help="JSON with the chosen ids and components (default: query.json)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    _add_model_flags(p)

    # -- the annotation workflow (asfda.project) ---------------------------------------------------
    p = sub.add_parser("init", help="create an annotation project: pretrained model + unlabeled pool")
    p.add_argument("out", help="project folder to create")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--pool", "--data", dest="pool", required=True,
                   help="the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--labels", help="JSON of label name -> value for a plain NIfTI folder (default: the model's "
                   "classes; nnU-Net pools use their dataset.json)")
    _add_strategy(p, "the query strategy of every round")
    p.add_argument("--budget", type=int, default=2, help="cases to annotate per round (default: 2)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round (default: 200)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--allow-empty-labels", action="store_true", help="accept label maps with no foreground")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights, even when the adapted "
                   "model's organs are more fragmented than the pretrained model's")
    _add_model_flags(p, fine_tunes=True, trust_extra="; not stored in the project: pass it to next and finetune too")
    project_commands = [
        ("next", "score the pool and export the next cases to annotate",
         [("--force", "replace a pending query whose labels are not all in")]),
        ("ingest", "check annotators' label files against their images and keep the good ones", []),
        ("finetune", "fine-tune on every label so far (one round)",
         [("--force", "train a round even without new labels")]),
        ("status", "where an annotation project stands and what to do next",
         [("--json", "print the summary as JSON")]),
    ]
    for name, text, flags in project_commands:
        p = sub.add_parser(name, help=text)
        if name == "ingest":
            p.add_argument("labels", help="folder of CASE.nii.gz label maps")
        p.add_argument("project", nargs="?", default=".", help="project folder (default: .)")
        for flag, flag_help in flags:
            p.add_argument(flag, action="store_true", help=flag_help)
        if name in ("next", "finetune"):  # they run the model: the project's device, unless told otherwise
            _add_device(p, default=None)
        if name == "finetune":
            _add_precision(p)
        if name == "next":  # it scores the pool
            _add_inference_precision(p)
        if name in ("next", "finetune"):  # they load the model: trust is given each time, never stored
            _add_trust(p, "; given each time (a project does not store it)")
        _add_common(p)
    p = sub.add_parser("set", help="change a project's settings (budget, strategy, steps, ...) with the checks of init")
    p.add_argument("project", help="project folder")
    p.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="e.g. budget=3 strategy=random steps=100 "
                   "train.guard=false (asfda status --json shows the project; project.json holds every setting)")
    _add_common(p)
    return parser
