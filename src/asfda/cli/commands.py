"""The commands that run a model or write data (demo, phantom, simulate, crossval, evaluate, predict, score,
query): each calls one library function, imported when the command runs; the annotation project's commands are
`asfda.cli.project_commands`."""

from __future__ import annotations

import argparse
import os
import sys

from asfda.cli.project_commands import project_command
from asfda.errors import AsfdaError

__all__ = ["SHARDED_COMMANDS", "dispatch"]

SHARDED_COMMANDS = frozenset({"score", "query", "simulate", "next", "finetune"})
"""The commands that share their work over the ranks of a ``torchrun`` job (`asfda.distributed`); any other runs on
rank 0 alone."""


def _alone_on_rank_0(command: str) -> bool:
    """Under torchrun (``WORLD_SIZE > 1``) a command that does not shard runs on rank 0 as one process (its
    ``WORLD_SIZE`` set to 1) and the other ranks return at once, so no file is written twice. True on those ranks."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE") or 1), int(os.environ.get("RANK") or 0)
    except ValueError:
        return False  # rank_context names the bad variable when a sharded command reads it
    if world <= 1 or command in SHARDED_COMMANDS:
        return False
    if rank != 0:
        return True
    os.environ["WORLD_SIZE"] = "1"
    print(f"asfda {command} does not share its work over torchrun's {world} processes: rank 0 runs it alone",
          file=sys.stderr)
    return False


def dispatch(args: argparse.Namespace) -> int:
    """Runs the command; a full disk, an exceeded quota or an I/O error met anywhere in it
    (`asfda.io.atomic.write_failure`) is the one-line `AsfdaError` (the commands that write remove what they left
    unfinished first: `asfda.io.atomic.write_failures_as_errors`), never a traceback."""
    try:
        return _run(args)
    except AsfdaError:
        raise
    except Exception as exc:
        from asfda.io.atomic import write_failure

        reason = write_failure(exc)
        if reason is None:
            raise
        raise AsfdaError(f"{reason}: asfda {args.command} stopped", getattr(exc, "filename", None),
                         "free some space on that disk (or write to another), then run the same command "
                         "again") from None


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if _alone_on_rank_0(args.command):
        return 0
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
            raise AsfdaError("simulate needs a model and a pool",
                             fix="pass --model and --pool, or set them in --config")
        result = run_simulation(cfg)
        if not result.written:  # another rank of a torchrun job: rank 0 prints
            return 0
        print(results_table(result.summary))
        print(f"results: {result.out_dir}")
    elif args.command == "crossval":
        import shlex

        from asfda.config import load_config
        from asfda.crossval import crossval, plan_seeds
        from asfda.crossval.report import console_tables

        cfg = load_config(args.config, {
            **dict(args.set or []), "model": args.model, "strategies": args.strategies, "budget": args.budget,
            "rounds": args.rounds, "seeds": args.seeds, "train.steps": args.steps, "class_map": args.class_map,
            "upper_bound": False if args.no_upper_bound else None, "upper_bound_steps": args.upper_bound_steps,
            "cache_dir": args.cache_dir, "threads": args.threads, "device": args.device,
            "train.precision": args.precision, "trust_model_code": True if args.trust_model_code else None,
            "output_activation": args.output_activation, "progress": progress, "report": False})
        summary = crossval(cfg, args.data, args.out, folds=args.folds, fold_seed=args.fold_seed,
                           seeds=plan_seeds(cfg.strategies, cfg.seeds, args.random_seeds), only_folds=args.only_folds,
                           summarize_only=args.summarize_only, utility=args.utility,
                           command="asfda " + shlex.join(sys.argv[1:]))
        print(console_tables(summary))
        print(f"results: {args.out} (README.md, report.html, summary.json)")
    elif args.command == "evaluate":
        from asfda.evaluate import evaluate_model

        evaluate_model(args.model, args.data, args.out, model_config=args.model_config, class_map=args.class_map,
                       progress=progress, trust_model_code=args.trust_model_code, device=args.device,
                       output_activation=args.output_activation, precision=args.precision)
    elif args.command == "predict":
        from asfda.predict import predict_model

        predict_model(args.model, args.images, args.out, model_config=args.model_config, class_map=args.class_map,
                      tta=args.tta, overwrite=args.overwrite, device=args.device, progress=progress,
                      largest_component=args.largest_component,
                      trust_model_code=args.trust_model_code, output_activation=args.output_activation,
                      precision=args.precision)
    elif args.command == "score":
        from asfda.query import score_dataset

        score_dataset(args.model, args.data, args.out, strategies=args.strategies, temperature=args.temperature,
                      seed=args.seed, model_config=args.model_config, class_map=args.class_map, device=args.device,
                      progress=progress, trust_model_code=args.trust_model_code,
                      output_activation=args.output_activation, precision=args.precision)
    elif args.command == "query":
        from asfda.query import query_dataset
        from asfda.selection import DEFAULT_DIVERSITY

        query_dataset(args.model, args.data, args.strategy, args.budget, args.out, labelled=args.labelled,
                      seed=args.seed, temperature=args.temperature, alpha=args.alpha, round0_gap=args.round0_gap,
                      diversity=args.diversity or DEFAULT_DIVERSITY, representativeness=args.representativeness,
                      model_config=args.model_config,
                      class_map=args.class_map, device=args.device, progress=progress,
                      trust_model_code=args.trust_model_code, output_activation=args.output_activation,
                      precision=args.precision)
    elif args.command in ("init", "next", "ingest", "finetune", "status", "set"):
        return project_command(args, progress)
    return 0
