"""Command line: parses, checks paths, calls one library function. Heavy imports are lazy."""

from __future__ import annotations

import argparse
import logging
import sys

from asfda.errors import AsfdaError

__all__ = ["main"]


def _add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (CUDA when available), cpu, cuda, cuda:1 ... "
                   f"(default: {default or 'the config file, else auto'})")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fine-tuning precision: fp32, or bf16 autocast (faster on CPUs with bf16 instructions and on "
                   "GPUs) (default: the config's, fp32)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


TRUST_MODEL_CODE_HELP = ("build the model config with MONAI's full ConfigParser (runs $ expressions and any _target_): "
                         "only for bundles you trust")


def _add_trust(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_MODEL_CODE_HELP + extra)


def _add_output_activation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-activation", choices=["softmax", "sigmoid", "none"], default=None,
                   help="what turns the network's output into probabilities: softmax, sigmoid, or none for a network "
                   "that already outputs probabilities (no second softmax) (default: what the model declares: "
                   "asfda_output_activation in its config, its metadata, its postprocessing; else softmax)")


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
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = sub.add_parser("phantom", help="write the two-domain phantom benchmark (nnU-Net raw datasets)")
    p.add_argument("out", help="output folder (gets source/ and target/)")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--pool", "--data", dest="pool", help="labelled dataset used as the unlabeled pool (nnU-Net raw or NIfTI folder)")
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
    _add_device(p, default=None)
    _add_precision(p)
    _add_trust(p)
    _add_output_activation(p)
    _add_common(p)

    p = sub.add_parser("evaluate", help="Dice per case and class of a model on a labelled dataset")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="labelled dataset (nnU-Net raw or NIfTI folder)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--out", default="runs/evaluate", help="folder for per_case.csv and summary.json")
    _add_device(p)
    _add_trust(p)
    _add_output_activation(p)
    _add_common(p)

    p = sub.add_parser("predict", help="segment every image of a folder; label maps on each image's own grid")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint (preprocessing, class names "
                   "for a TorchScript file)")
    p.add_argument("--data", "--images", dest="images", required=True, help="nnU-Net raw dataset (values from its dataset.json) or a folder "
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
    _add_device(p)
    _add_trust(p)
    _add_output_activation(p)
    _add_common(p)

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
    p.add_argument("--seed", type=int, default=0, help="seeds the MC-dropout passes")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    _add_device(p)
    _add_trust(p)
    _add_output_activation(p)
    _add_common(p)

    p = sub.add_parser("query", help="pick the next batch of cases to annotate (prints ids and score components)")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="the pool (nnU-Net raw or NIfTI folder; labels not needed)")
    _add_strategy(p, "the query strategy")
    p.add_argument("--budget", type=int, required=True, help="number of cases to pick")
    p.add_argument("--labelled", help="ids already labelled: text file (one per line), JSON list, or a previous "
                   "query.json (its labelled + ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, help="T of softmax(z / T) (default: fitted on the labelled cases "
                   "that have label files, else 1.0)")
    p.add_argument("--alpha", type=float, default=0.5, help="asfda: weight of the divergence rank vs ASD")
    p.add_argument("--round0-gap", default="feature_gap", choices=["feature_gap", "norm_kl"],
                   help="asfda: first-query divergence for networks without BatchNorm statistics (default: "
                   "feature_gap, as METHOD.md specifies)")
    p.add_argument("--diversity", default=None, choices=["anatomy", "embedding", "none"],
                   help="asfda: the space of the diverse batch pick: 'anatomy', the predicted foreground composition, "
                   "'embedding', the pooled bottleneck embedding (METHOD.md's h), or 'none' (no diversity term: an ablation) "
                   "(default: embedding)")
    p.add_argument("--representativeness", default="none", choices=["none", "density", "typical"],
                   help="asfda: 'density' adds TypiClust's typicality (dense regions of the pool first), weighted "
                   "0.5 / (1 + labelled); 'typical' also leaves the least typical 0.2 / (1 + labelled) of the pool out "
                   "and caps the diversity factor, so no pick is an outlier; 'none' is METHOD.md's rule (default: none)")
    p.add_argument("--out", default="query.json", help="JSON with the chosen ids and components (default: query.json)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    _add_device(p)
    _add_trust(p)
    _add_output_activation(p)
    _add_common(p)

    # -- the annotation workflow (asfda.project) ---------------------------------------------------
    p = sub.add_parser("init", help="create an annotation project: pretrained model + unlabeled pool")
    p.add_argument("out", help="project folder to create")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--pool", "--data", dest="pool", required=True, help="the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--labels", help="JSON of label name -> value for a plain NIfTI folder (default: the model's "
                   "classes; nnU-Net pools use their dataset.json)")
    _add_strategy(p, "the query strategy of every round")
    p.add_argument("--budget", type=int, default=2, help="cases to annotate per round (default: 2)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--allow-empty-labels", action="store_true", help="accept label maps with no foreground")
    p.add_argument("--no-guard", action="store_true", help="keep every round's weights, even when the adapted "
                   "model's organs are more fragmented than the pretrained model's")
    _add_precision(p)
    _add_device(p)
    _add_trust(p, "; kept in the project's settings, so next and finetune build it the same way")
    _add_output_activation(p)
    _add_common(p)
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
        _add_common(p)
    p = sub.add_parser("set", help="change a project's settings (budget, strategy, steps, ...) with the checks of init")
    p.add_argument("project", help="project folder")
    p.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="e.g. budget=3 strategy=random steps=100 "
                   "train.guard=false (asfda status --json shows the project; project.json holds every setting)")
    _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # nothing done: say so, and not with exit code 0
        parser.print_help(sys.stderr)
        print("asfda: error: name a command (asfda COMMAND --help for its options)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="asfda: %(levelname)s: %(message)s")
    _quiet_warnings()
    try:
        return _dispatch(args)
    except AsfdaError as exc:
        if args.debug:
            raise
        print(f"asfda: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asfda: interrupted; finished rounds are saved, run the same command again to resume", file=sys.stderr)
        return 130


def _quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\..*")


def _dispatch(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "demo":
        from asfda.demo import run_demo

        run_demo(args.out, args.data, args.seed, progress=progress)
    elif args.command == "phantom":
        from asfda.phantom import generate_benchmark

        paths = generate_benchmark(args.out, seed=args.seed, n_source=args.n_source, n_target=args.n_target,
                                   overwrite=args.overwrite, n_misleading=args.n_misleading)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    elif args.command == "simulate":
        from asfda.config import load_config
        from asfda.simulate import results_table, run_simulation

        cfg = load_config(args.config, {
            "model": args.model, "pool": args.pool, "test": args.test, "strategies": args.strategies,
            "budget": args.budget, "rounds": args.rounds, "seeds": args.seeds, "train.steps": args.steps,
            "class_map": args.class_map, "out_dir": args.out, "progress": progress,
            "upper_bound": False if args.no_upper_bound else None,
            "train.guard": False if args.no_guard else None, "upper_bound_steps": args.upper_bound_steps,
            "device": args.device, "train.precision": args.precision,
            "trust_model_code": True if args.trust_model_code else None,
            "output_activation": args.output_activation})
        if not cfg.model or not cfg.pool:
            raise AsfdaError("simulate needs a model and a pool", fix="pass --model and --pool, or set them in --config")
        result = run_simulation(cfg)
        print(results_table(result.summary))
        print(f"results: {result.out_dir}")
    elif args.command == "evaluate":
        from asfda.predict import evaluate_model

        evaluate_model(args.model, args.data, args.out, model_config=args.model_config, class_map=args.class_map,
                       progress=progress, trust_model_code=args.trust_model_code, device=args.device,
                       output_activation=args.output_activation)
    elif args.command == "predict":
        from asfda.predict import predict_model

        predict_model(args.model, args.images, args.out, model_config=args.model_config, class_map=args.class_map,
                      tta=args.tta, overwrite=args.overwrite, device=args.device, progress=progress,
                      largest_component=args.largest_component,
                      trust_model_code=args.trust_model_code, output_activation=args.output_activation)
    elif args.command == "score":
        from asfda.query import score_dataset

        score_dataset(args.model, args.data, args.out, strategies=args.strategies, temperature=args.temperature,
                      seed=args.seed, model_config=args.model_config, class_map=args.class_map, device=args.device,
                      progress=progress, trust_model_code=args.trust_model_code,
                      output_activation=args.output_activation)
    elif args.command == "query":
        from asfda.query import query_dataset
        from asfda.selection import DEFAULT_DIVERSITY

        query_dataset(args.model, args.data, args.strategy, args.budget, args.out, labelled=args.labelled,
                      seed=args.seed, temperature=args.temperature, alpha=args.alpha, round0_gap=args.round0_gap,
                      diversity=args.diversity or DEFAULT_DIVERSITY, representativeness=args.representativeness,
                      model_config=args.model_config,
                      class_map=args.class_map, device=args.device, progress=progress,
                      trust_model_code=args.trust_model_code, output_activation=args.output_activation)
    elif args.command in ("init", "next", "ingest", "finetune", "status", "set"):
        return _project_command(args, progress)
    return 0


def _n(count: int, word: str, plural: str | None = None) -> str:
    """``1 case``, ``2 cases``."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _project_command(args: argparse.Namespace, progress: bool) -> int:
    import json

    from asfda import project as prj

    if args.command == "init":
        from asfda.training import TrainConfig

        settings = prj.ProjectSettings(strategy=args.strategy, budget=args.budget, seed=args.seed,
                                       class_map=args.class_map, allow_empty_labels=args.allow_empty_labels,
                                       device=args.device, trust_model_code=args.trust_model_code,
                                       output_activation=args.output_activation,
                                       train=TrainConfig(steps=args.steps, guard=not args.no_guard,
                                                         precision=args.precision or "fp32"))
        p = prj.init_project(args.out, args.model, args.pool, settings, labels_json=args.labels)
        print(f"project created: {p.root} ({p.state['pool_cases']} pool cases, labels {p.state['labels']})")
        print(f"next: asfda next {p.root}")
    elif args.command == "next":
        q = prj.next_query(args.project, progress=progress, force=args.force, device=args.device)
        root = prj.Project(args.project).root
        if q.get("shown_again"):
            print(f"round {q['round']}'s query is still waiting for labels (shown again; --force replaces it)")
        if q.get("replaces"):
            rep = q["replaces"]
            print(f"round {rep['round']}'s fine-tuning was discarded by the guard; this query replaces "
                  f"{', '.join(rep['ids'])} ({'its label is' if len(rep['ids']) == 1 else 'their labels are'} kept: "
                  "see `asfda status`)")
        if q.get("budget") is not None and len(q["ids"]) < q["budget"]:
            left = len(q["ids"])
            print(f"only {left} unlabeled case{' is' if left == 1 else 's are'} left, fewer than the budget "
                  f"{q['budget']}: this round asks for {'it' if left == 1 else 'all of them'}")
        n = len(q["ids"])
        print(f"round {q['round']}: annotate {'this case' if n == 1 else f'these {n} cases'} "
              f"({q['strategy']}, T={q['temperature']:.3g}):")
        for cid in q["ids"]:
            comps = ", ".join(f"{k}={v:.3g}" for k, v in q["components"].get(cid, {}).items())
            print(f"  {cid}  {comps}")
        print(f"images, previews and instructions: {root / q['folder']}")
        print(f"then: asfda ingest LABELS_DIR {root}")
    elif args.command == "ingest":
        res = prj.ingest_labels(args.project, args.labels)
        if not res["accepted"] and not res["refused"] and not res.get("unchanged"):
            print(f"asfda: error: no label files (CASE.nii.gz) in {args.labels}: nothing ingested", file=sys.stderr)
            return 2
        if res.get("unchanged") and not res["accepted"] and not res["refused"]:
            print(f"nothing new: {_n(len(res['unchanged']), 'label')} in {args.labels} "
                  f"{'is' if len(res['unchanged']) == 1 else 'are'} already ingested, unchanged")
        for cid in res["accepted"]:
            print(f"accepted: {cid}" + (" (replaces the earlier label)" if cid in res["replaced"] else ""))
        for bad in res["refused"]:
            print(f"refused: {bad['file']}: {bad['reason']}", file=sys.stderr)
        status = prj.project_status(args.project)
        print(f"{status['labelled']} labelled in all; next: {status['next']}")
        return 1 if res["refused"] else 0
    elif args.command == "finetune":
        rec = prj.finetune_project(args.project, progress=progress, force=args.force, device=args.device,
                                   precision=args.precision)
        root = prj.Project(args.project).root
        print(f"round {rec['round']} fine-tuned on {_n(len(rec['labelled_ids']), 'labelled case')} in {rec['seconds']:.0f} s "
              f"(final loss {rec['loss_final']:.3f}); adapted model: {root / 'model'}")
        if rec.get("guard"):
            from asfda.training.guard import GuardResult

            print(GuardResult(**rec["guard"]).message())
        st = prj.project_status(root)
        print(_stop_line(st["when_to_stop"]))
        print(f"next: {st['next']}")
    elif args.command == "status":
        st = prj.project_status(args.project)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(f"project {st['project']}: {_n(st['rounds_finished'], 'round')} fine-tuned, {st['labelled']} of "
                  f"{_n(st['pool_cases'], 'pool case')} labelled")
            if st["pending_query"]:
                q = st["pending_query"]
                print(f"pending query (round {q['round']}): {', '.join(q['ids'])}; missing labels: "
                      f"{', '.join(q['missing_labels']) or 'none'}")
            if st["labelled_not_trained"]:
                print(f"labelled, not yet trained on: {', '.join(st['labelled_not_trained'])}")
            for d in st.get("discarded_rounds", []):
                harmful = d.get("harmful") or d["new_ids"]
                one = len(harmful) == 1
                print(f"round {d['round']} was discarded by the guard: trained with "
                      f"{', '.join(harmful) or 'no new volume'} ({'its' if one else 'their'} first round, so the harmful "
                      f"{'volume' if one else 'volumes'}), the model's organs on {_n(len(d.get('cases', [])), 'unlabeled volume')} "
                      f"were more fragmented than the pretrained model's (plausibility "
                      f"{d.get('plausibility_adapted', float('nan')):.3f} < {d.get('plausibility_pretrained', float('nan')):.3f}: "
                      f"the mean fraction of each organ in its largest connected piece); {'its label is' if one else 'the labels are'} "
                      "kept" + ("" if st.get("hold_back_discarded") else
                                f" and trained on again (`asfda set {st['project']} hold_back_discarded=true` leaves "
                                f"{'it' if one else 'them'} out until 3 other labels exist)"))
            for e in st.get("annotation_effort", []):
                print(f"round {e['round']}: the pre-segmentations of {_n(e['cases'], 'case')} matched the final labels "
                      f"with Dice {e['edit_dice_mean']:.3f} ({100 * e['fraction_changed_mean']:.2f}% of voxels "
                      "changed by the annotators)")
            if st.get("held_back"):
                print(f"held back from training (their labels are kept): {', '.join(st['held_back'])}")
            print(_stop_line(st["when_to_stop"]))
            print(f"next: {st['next']}")
    elif args.command == "set":
        changes = {}
        for item in args.settings:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise AsfdaError(f"{item!r} is not KEY=VALUE", fix="write each setting as key=value, e.g. budget=3")
            changes[key.strip()] = value.strip()
        changed = prj.update_settings(args.project, changes)
        for name, old, new in changed:
            print(f"{name}: {old} -> {new}")
        if not changed:
            print("nothing changed: " + ", ".join(f"{k} is already {v}" for k, v in changes.items()))
        pending = prj.Project(args.project).state.get("query")
        if changed and pending:
            print(f"the pending query of round {pending['round']} keeps its {_n(len(pending['ids']), 'case')}; "
                  "the new settings apply from the next query and round")
    return 0


def _stop_line(est: dict) -> str:
    from asfda.stopping import StopEstimate

    return StopEstimate(**est).message()


if __name__ == "__main__":
    sys.exit(main())
