"""The command line's arguments: `build_parser`, one function per command, each naming its handler
(``set_defaults(func=...)``: `asfda.cli.commands`, `asfda.cli.project_commands`). The shared flags, their types and
their defaults are `asfda.cli.flags`. Nothing heavy is imported here (the strategy registry only when a strategy is
given or help is printed)."""

from __future__ import annotations

import argparse

from asfda.cli import commands
from asfda.cli import project_commands as project
from asfda.cli.flags import (
    IMAGE_MODES,
    HelpFormatter,
    add_common,
    add_device,
    add_inference_precision,
    add_model_flags,
    add_precision,
    add_strategies,
    add_strategy,
    add_trust,
    alpha,
    device_type,
    from_settings,
    int_list,
    run_default,
    seed,
    seed_list,
    setting,
)
from asfda.options import DIVERSITY_SPACES, REPRESENTATIVENESS, ROUND0_GAPS

__all__ = ["build_parser"]

_Sub = argparse._SubParsersAction
MODEL_HELP = "bundle folder, checkpoint or TorchScript file"
CLASS_MAP_HELP = "target=source,... overrides of the name match"


def build_parser() -> argparse.ArgumentParser:
    from asfda import __version__

    parser = argparse.ArgumentParser(
        prog="asfda", description="Adapt a pretrained 3D segmentation model to a new domain with few annotations: "
        "choose which scans to label, fine-tune on them, measure.")
    parser.add_argument("--version", action="version", version=f"asfda {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_demo, _phantom, _simulate, _crossval, _evaluate, _predict, _score, _query, _init, _project_steps,
                _set, _monailabel_app):
        add(sub)
    return parser


def _command(sub: _Sub, name: str, text: str, handler) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, formatter_class=HelpFormatter)
    p.set_defaults(func=handler)
    return p


def _demo(sub: _Sub) -> None:
    p = _command(sub, "demo", "run the whole loop on the embedded phantom benchmark (asfda vs random)",
                 commands.demo_command)
    p.add_argument("--out", default="runs/demo", help="results folder (default: runs/demo)")
    p.add_argument("--data", default=".cache/phantom", help="where the phantom data is generated and cached")
    p.add_argument("--seed", type=seed, default=0)
    add_common(p)


def _phantom(sub: _Sub) -> None:
    p = _command(sub, "phantom", "write the two-domain phantom benchmark (nnU-Net raw datasets)",
                 commands.phantom_command)
    p.add_argument("out", help="output folder (gets source/ and target/)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--n-source", type=int, default=24)
    p.add_argument("--n-target", type=int, default=40)
    p.add_argument("--n-misleading", type=int, default=0,
                   help="extra target cases of the misleading sub-population (cystic livers, modelled on the real "
                        "pool's outlier: atypical, and harmful when learned alone); appended after the others")
    p.add_argument("--overwrite", action="store_true")
    add_common(p)


def _recipe(p: argparse.ArgumentParser, seeds_help: str | None = None) -> None:
    """--budget, --rounds, (--seeds) and --steps of simulate and crossval (None: the config's, else the run
    config's)."""
    p.add_argument("--budget", type=int, help=f"volumes labelled per round (default: the config's, else "
                   f"{run_default('budget')})")
    p.add_argument("--rounds", type=int, help=f"(default: the config's, else {run_default('rounds')})")
    if seeds_help:
        p.add_argument("--seeds", help=seeds_help)
    p.add_argument("--steps", type=int, help=f"fine-tuning steps per round (default: the config's, else "
                   f"{run_default('train.steps')})")


def _simulate(sub: _Sub) -> None:
    p = _command(sub, "simulate", "simulate strategies x budgets x seeds with labels from the dataset",
                 commands.simulate_command)
    p.add_argument("--config", help="YAML run config (see docs); flags below override it")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--pool", "--data", dest="pool",
                   help="labelled dataset used as the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--test", help="separate labelled test dataset (default: a seeded split of the pool)")
    add_strategies(p, "each runs with the same seeds and recipe (default: "
                   f"{','.join(run_default('strategies'))})")
    _recipe(p, "comma-separated seeds (default: the config's, else "
            f"{','.join(map(str, run_default('seeds')))})")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    p.add_argument("--no-upper-bound", action="store_true", help="skip the full-pool upper bound")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights (no non-regression guard)")
    p.add_argument("--upper-bound-steps", type=int, help="steps of the upper bound (default: steps x rounds)")
    p.add_argument("--out", help="results folder (not inside the pool, the test set or the model)")
    add_model_flags(p, fine_tunes=True, device="config")


def _crossval(sub: _Sub) -> None:
    p = _command(sub, "crossval", "K-fold cross-validation on a labelled dataset: every volume tested once, each "
                 "strategy against random with 95%% bootstrap intervals (summary.json, README.md, report.html)",
                 commands.crossval_command)
    p.add_argument("--model", help=f"{MODEL_HELP} (not needed with --summarize-only)")
    p.add_argument("--data", required=True, help="the labelled dataset (nnU-Net raw or NIfTI folder); fold k's pool "
                   "is every volume outside its test fold")
    p.add_argument("--out", required=True, help="results folder: folds.json, fold<k>/ (simulate's files), "
                   "summary.json, README.md, report.html; rerun the same command to resume")
    p.add_argument("--folds", type=int, default=5, help="K (default: 5); the folds' sizes differ by at most one")
    p.add_argument("--fold-seed", type=seed, default=0, help="seeds the fold assignment (default: 0)")
    p.add_argument("--config", help="YAML run config: the recipe of every fold (as simulate's); flags override it")
    p.add_argument("--set", action="append", type=setting, metavar="KEY=VALUE", help="one run-config setting, "
                   "e.g. --set representativeness=density --set train.hold_back_discarded=true (repeatable)")
    add_strategies(p, "each compared with random, which is added when missing (default: "
                   f"{','.join(run_default('strategies'))})")
    p.add_argument("--seeds", help="comma-separated seeds of every strategy but random (default: the config's, "
                   f"{','.join(map(str, run_default('seeds')))})")
    p.add_argument("--random-seeds", type=seed_list, help="random's seeds (default: --seeds continued to 3 seeds)")
    _recipe(p)
    p.add_argument("--no-upper-bound", action="store_true", help="skip the whole-pool upper bound")
    p.add_argument("--upper-bound-steps", type=int, help="steps of the upper bound, run on the first seed "
                   "(default: steps x rounds)")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    p.add_argument("--cache-dir", help="prepared volumes and the folds' symlink datasets (default: the config's, "
                   f"{run_default('cache_dir')})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--only-folds", type=int_list, metavar="K,...", help="run only these folds (other processes run "
                   "the others into the same --out; on another machine, copy its fold<k> folders into --out and "
                   "--summarize-only)")
    p.add_argument("--summarize-only", action="store_true", help="run nothing: summarise the fold folders on disk")
    p.add_argument("--upper-bound-only", action="store_true", help="run only each fold's whole-pool upper bound (on "
                   "the first seed; the strategies' rounds are neither read nor resumed): adds it to a run made with "
                   "--no-upper-bound")
    p.add_argument("--utility", help="a single-label utility table (benchmarks/single_label_utility.py's "
                   "utility.json): the best and the expected random first label, set beside n=1")
    add_model_flags(p, fine_tunes=True, device="config")


def _model_input(p: argparse.ArgumentParser, data: str, config: str = "network config for a bare checkpoint") -> None:
    """--model, --model-config and --data of a command that runs a model on a dataset."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--model-config", help=config)
    p.add_argument("--data", required=True, help=data)


def _evaluate(sub: _Sub) -> None:
    p = _command(sub, "evaluate", "Dice per case and class of a model on a labelled dataset",
                 commands.evaluate_command)
    _model_input(p, "labelled dataset (nnU-Net raw or NIfTI folder)")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    p.add_argument("--out", default="runs/evaluate", help="folder for per_case.csv and summary.json")
    add_model_flags(p)


def _predict(sub: _Sub) -> None:
    p = _command(sub, "predict", "segment every image of a folder; label maps on each image's own grid",
                 commands.predict_command)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--model-config", help="network config for a bare checkpoint (preprocessing, class names "
                   "for a TorchScript file)")
    p.add_argument("--data", "--images", dest="images", required=True,
                   help="nnU-Net raw dataset (values from its dataset.json) or a folder "
                   "of NIfTI images (the model's class indices, named in OUT/labels.json); labels not needed")
    p.add_argument("--out", required=True, help="folder for CASE.nii.gz label maps (cases already done are skipped)")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    p.add_argument("--largest-component", metavar="all|CLASS,...", help="cut each named class (or all) to its "
                   "largest connected component (nnU-Net's post-processing; on the cross-validated CT -> MR benchmark "
                   "it raised the mean Dice at every labelled count, but lowered single classes on the atypical "
                   "volume chaos_036 and on zero-shot predictions: benchmarks/results/recipe)")
    p.add_argument("--tta", action="store_true", help="average over flips along the model grid's A-P and S-I "
                   "axes (3 passes; never left-right)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs are up to date")
    p.add_argument("--dicom-seg", action="store_true", help="for an image that is a DICOM series folder, also write "
                   "OUT/CASE.seg.dcm: the label map as a DICOM SEG referencing the series' slices (needs highdicom: "
                   "pip install 'asfda[dicom]'); other images get their NIfTI label map only")
    add_model_flags(p)


def _score(sub: _Sub) -> None:
    p = _command(sub, "score", "score every case of a pool with the zero-shot model (per-case CSV of every metric "
                 "and component, embeddings .npy beside it)", commands.score_command)
    _model_input(p, "the pool (nnU-Net raw or NIfTI folder; labels not needed)")
    p.add_argument("--out", default="scores.csv", help="per-case CSV (default: scores.csv); OUT-stem.embeddings.npy "
                   "and OUT-stem.json are written beside it")
    add_strategies(p, "their needs decide the passes (default: all; MC-dropout ones are skipped for a network "
                   "without dropout)")
    p.add_argument("--temperature", type=float, default=run_default("temperature0"),
                   help="T of softmax(z / T) (default %(default)s)")
    from_settings(p.add_argument("--seed", type=seed, help="seeds the MC-dropout passes"), "seed")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    add_model_flags(p)


def _query(sub: _Sub) -> None:
    p = _command(sub, "query", "pick the next batch of cases to annotate (prints ids and score components)",
                 commands.query_command)
    _model_input(p, "the pool (nnU-Net raw or NIfTI folder; labels not needed)")
    add_strategy(p, "the query strategy")
    p.add_argument("--budget", type=int, required=True, help="number of cases to pick")
    p.add_argument("--labelled", help="ids already labelled: text file (one per line), JSON list, or a previous "
                   "query.json (its labelled + ids)")
    from_settings(p.add_argument("--seed", type=seed, help="seeds the pick (random draws, MC-dropout passes)"),
                  "seed")
    p.add_argument("--temperature", type=float, help="T of softmax(z / T) (default: fitted on the labelled cases "
                   "that have label files, else 1.0)")
    p.add_argument("--alpha", type=alpha, default=run_default("alpha"), help="asfda: weight of the divergence rank "
                   "vs ASD, in [0, 1] (default: %(default)s)")
    p.add_argument("--round0-gap", default=run_default("round0_gap"), choices=ROUND0_GAPS,
                   help="asfda: first-query divergence for networks without BatchNorm statistics (default: "
                   "%(default)s, as METHOD.md specifies)")
    p.add_argument("--diversity", default=run_default("diversity"), choices=DIVERSITY_SPACES,
                   help="asfda: the space of the diverse batch pick: 'anatomy', the predicted foreground composition, "
                   "'embedding', the pooled bottleneck embedding (METHOD.md's h), or 'none' (no diversity term: an "
                   "ablation) (default: %(default)s)")
    p.add_argument("--representativeness", default=run_default("representativeness"), choices=REPRESENTATIVENESS,
                   help="asfda: 'complete' takes the first label (nothing labelled yet) by the completeness of the "
                   "predicted anatomy, then is 'density'; 'density' adds TypiClust's typicality (dense regions of the "
                   "pool first), weighted 0.5 / (1 + labelled); 'typical' also leaves the least typical 0.2 / "
                   "(1 + labelled) of the pool out and caps the diversity factor, so no pick is an outlier; 'none' is "
                   "METHOD.md's rule (default: %(default)s)")
    p.add_argument("--out", default="query.json", help="JSON with the chosen ids and components (default: query.json)")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    add_model_flags(p)


# -- the annotation workflow (asfda.project) ---------------------------------------------------------------
def _init(sub: _Sub) -> None:
    p = _command(sub, "init", "create an annotation project: pretrained model + unlabeled pool", project.init_command)
    p.add_argument("out", help="project folder to create")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--pool", "--data", dest="pool", required=True,
                   help="the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--labels", help="JSON of label name -> value for a plain NIfTI folder (default: the model's "
                   "classes; nnU-Net pools use their dataset.json)")
    add_strategy(p, "the query strategy of every round")
    from_settings(p.add_argument("--budget", type=int, help="cases to annotate per round"), "budget")
    from_settings(p.add_argument("--steps", type=int, help="fine-tuning steps per round"), "train.steps")
    from_settings(p.add_argument("--seed", type=seed, help="seeds the project's rounds"), "seed")
    p.add_argument("--class-map", help=CLASS_MAP_HELP)
    p.add_argument("--allow-empty-labels", action="store_true", help="accept label maps with no foreground")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights, even when the adapted "
                   "model's organs are more fragmented than the pretrained model's")
    add_model_flags(p, fine_tunes=True, device="project",
                    trust_extra="; not stored in the project: pass it to next and finetune too")


def _project_steps(sub: _Sub) -> None:
    """next, ingest, finetune and status: a project folder (default: .) and their flags."""
    steps = [("next", "score the pool and export the next cases to annotate", project.next_command,
              [("--force", "replace a pending query whose labels are not all in")]),
             ("ingest", "check annotators' label files against their images and keep the good ones",
              project.ingest_command, []),
             ("finetune", "fine-tune on every label so far (one round)", project.finetune_command,
              [("--force", "train a round even without new labels")]),
             ("status", "where an annotation project stands and what to do next", project.status_command,
              [("--json", "print the summary as JSON")])]
    for name, text, handler, flags in steps:
        p = _command(sub, name, text, handler)
        if name == "ingest":
            p.add_argument("labels", help="folder of CASE.nii.gz label maps")
        p.add_argument("project", nargs="?", default=".", help="project folder (default: .)")
        for flag, flag_help in flags:
            p.add_argument(flag, action="store_true", help=flag_help)
        if name == "next":
            _next_images(p)
        if name in ("next", "finetune"):  # they run the model: the project's device, unless told otherwise
            add_device(p, None, "the project's")
            # finetune trains (the project's precision); next scores the pool (the inference precision)
            (add_precision if name == "finetune" else add_inference_precision)(p)
            add_trust(p, "; given each time (a project does not store it)")  # never stored
        add_common(p)


def _set(sub: _Sub) -> None:
    p = _command(sub, "set", "change a project's settings (budget, strategy, steps, ...) with the checks of init",
                 project.set_command)
    p.add_argument("project", help="project folder")
    p.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="e.g. budget=3 strategy=random steps=100 "
                   "train.guard=false (asfda status --json shows the project; project.json holds every setting)")
    add_common(p)


def _next_images(p: argparse.ArgumentParser) -> None:
    """next --images: how the round folder holds the pool's images (default: `asfda.project.next_query`'s)."""

    def default() -> str:
        import inspect

        from asfda.project import next_query

        return str(inspect.signature(next_query).parameters["images"].default)

    action = p.add_argument("--images", choices=IMAGE_MODES, metavar="MODE",
                            help="how the round folder holds the images to annotate: %(choices)s (copy: a folder "
                            "that can be moved or sent to the annotator's machine as it is; link: links relative to "
                            "the round folder, no copy, for an annotator on this machine)")
    action.default_source = default  # type: ignore[attr-defined]


def _monailabel_app(sub: _Sub) -> None:
    p = _command(sub, "monailabel-app", "write a MONAI Label app (3D Slicer, OHIF) whose Next Sample is asfda's query, "
                 "Train an asfda round and Infer the adapted model (asfda.monailabel)",
                 project.monailabel_app_command)
    p.add_argument("out", help="app folder to write: new, empty, or an app written before (its settings are replaced; "
                   "a started project keeps its own)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_strategy(p, "the project's query strategy")
    p.add_argument("--budget", type=int, help=f"cases per round (default: {project.APP_BUDGET}: MONAI Label's Next "
                   "Sample asks for one image at a time)")
    from_settings(p.add_argument("--steps", type=int, help="fine-tuning steps per round (one Train)"), "train.steps")
    from_settings(p.add_argument("--seed", type=seed, help="seeds the project's rounds"), "seed")
    from_settings(p.add_argument("--device", type=device_type, help="auto (CUDA when available), cpu, cuda, cuda:N, "
                                 "mps; the server's --conf device overrides it"), "device")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights, even when the adapted "
                   "model's organs are more fragmented than the pretrained model's")
    add_common(p)
