"""Command line: parses, checks paths, calls one library function. Heavy imports are lazy."""

from __future__ import annotations

import argparse
import logging
import sys

from asfda.errors import AsfdaError

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)

    p = sub.add_parser("simulate", help="simulate strategies x budgets x seeds with labels from the dataset")
    p.add_argument("--config", help="YAML run config (see docs); flags below override it")
    p.add_argument("--model", help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--pool", help="labelled dataset used as the unlabeled pool (nnU-Net raw or NIfTI folder)")
    p.add_argument("--test", help="separate labelled test dataset (default: a seeded split of the pool)")
    p.add_argument("--strategies", help="comma-separated strategy names")
    p.add_argument("--budget", type=int, help="volumes labelled per round")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="fine-tuning steps per round")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--out", help="results folder")
    _add_common(p)

    p = sub.add_parser("evaluate", help="Dice per case and class of a model on a labelled dataset")
    p.add_argument("--model", required=True, help="bundle folder, checkpoint or TorchScript file")
    p.add_argument("--model-config", help="network config for a bare checkpoint")
    p.add_argument("--data", required=True, help="labelled dataset (nnU-Net raw or NIfTI folder)")
    p.add_argument("--class-map", help="target=source,... overrides of the name match")
    p.add_argument("--out", default="runs/evaluate", help="folder for per_case.csv and summary.json")
    _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
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
                                   overwrite=args.overwrite)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    elif args.command == "simulate":
        from asfda.config import load_config
        from asfda.simulate import results_table, run_simulation

        cfg = load_config(args.config, {
            "model": args.model, "pool": args.pool, "test": args.test, "strategies": args.strategies,
            "budget": args.budget, "rounds": args.rounds, "seeds": args.seeds, "train.steps": args.steps,
            "class_map": args.class_map, "out_dir": args.out, "progress": progress})
        if not cfg.model or not cfg.pool:
            raise AsfdaError("simulate needs a model and a pool", fix="pass --model and --pool, or set them in --config")
        result = run_simulation(cfg)
        print(results_table(result.summary))
        print(f"results: {result.out_dir}")
    elif args.command == "evaluate":
        from asfda.predict import evaluate_model

        evaluate_model(args.model, args.data, args.out, model_config=args.model_config, class_map=args.class_map,
                       progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
