"""The commands that run a model or write data (demo, phantom, simulate, crossval, evaluate, predict, score,
query): one handler each, which calls one library function (imported when the command runs) and prints the record it
returns; the annotation project's commands are `asfda.cli.project_commands`. `dispatch` runs the handler the parser
named (``args.func``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from asfda.errors import AsfdaError

__all__ = ["SHARDED_COMMANDS", "crossval_command", "demo_command", "dispatch", "evaluate_command", "evaluation_table",
           "format_query", "phantom_command", "predict_command", "predict_summary", "query_command", "query_lines",
           "score_command", "score_lines", "simulate_command"]

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
    """Runs the command's handler (``args.func``); a full disk, an exceeded quota or an I/O error met anywhere in it
    (`asfda.io.atomic.write_failure`) is the one-line `AsfdaError` (the commands that write remove what they left
    unfinished first: `asfda.io.atomic.write_failures_as_errors`), never a traceback."""
    try:
        if _alone_on_rank_0(args.command):
            return 0
        return args.func(args)
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


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What every command that runs a model on a dataset passes on: the model config, the class map, how the model
    runs, and progress bars."""
    return dict(model_config=args.model_config, class_map=args.class_map, device=args.device,
                progress=_progress(args), trust_model_code=args.trust_model_code,
                output_activation=args.output_activation, precision=args.precision)


def _project_default(value: Any, name: str) -> Any:
    """``value``, or the project settings' default of ``name`` when the flag was not given."""
    from asfda.cli.flags import project_default

    return project_default(name) if value is None else value


def demo_command(args: argparse.Namespace) -> int:
    from asfda.demo import run_demo

    run_demo(args.out, args.data, args.seed, progress=_progress(args))
    return 0


def phantom_command(args: argparse.Namespace) -> int:
    from asfda.phantom import generate_benchmark

    paths = generate_benchmark(args.out, seed=args.seed, n_source=args.n_source, n_target=args.n_target,
                               overwrite=args.overwrite, n_misleading=args.n_misleading)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config settings simulate and crossval take from their flags (None: the config's)."""
    return {"strategies": args.strategies, "budget": args.budget, "rounds": args.rounds, "seeds": args.seeds,
            "train.steps": args.steps, "class_map": args.class_map,
            "upper_bound": False if args.no_upper_bound else None, "upper_bound_steps": args.upper_bound_steps,
            "device": args.device, "train.precision": args.precision,
            "trust_model_code": True if args.trust_model_code else None,
            "output_activation": args.output_activation, "progress": _progress(args)}


def simulate_command(args: argparse.Namespace) -> int:
    from asfda.config import load_config
    from asfda.simulate import results_table, run_simulation

    cfg = load_config(args.config, {**_run_flags(args), "model": args.model, "pool": args.pool, "test": args.test,
                                    "out_dir": args.out, "train.guard": False if args.no_guard else None})
    if not cfg.model or not cfg.pool:
        raise AsfdaError("simulate needs a model and a pool", fix="pass --model and --pool, or set them in --config")
    result = run_simulation(cfg)
    if not result.written:  # another rank of a torchrun job: rank 0 prints
        return 0
    print(results_table(result.summary))
    print(f"results: {result.out_dir}")
    return 0


def crossval_command(args: argparse.Namespace) -> int:
    import shlex

    from asfda.config import load_config
    from asfda.crossval import crossval, plan_seeds
    from asfda.crossval.report import console_tables

    cfg = load_config(args.config, {**dict(args.set or []), "model": args.model, **_run_flags(args),
                                    "cache_dir": args.cache_dir, "threads": args.threads, "report": False})
    summary = crossval(cfg, args.data, args.out, folds=args.folds, fold_seed=args.fold_seed,
                       seeds=plan_seeds(cfg.strategies, cfg.seeds, args.random_seeds), only_folds=args.only_folds,
                       summarize_only=args.summarize_only, upper_bound_only=args.upper_bound_only,
                       utility=args.utility,
                       command="asfda " + shlex.join(sys.argv[1:]))
    print(console_tables(summary))
    print(f"results: {args.out} (README.md, report.html, summary.json)")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from asfda.evaluate import evaluate_model

    print(evaluation_table(evaluate_model(args.model, args.data, args.out, **_model_kwargs(args))))
    return 0


def evaluation_table(result) -> str:
    """`asfda evaluate`'s table: the mean Dice and HD95 of each class (an `asfda.evaluate.Evaluation`), and where the
    files are; first, the note on the dataset classes the model does not segment, if any."""
    mean = result.record["mean"]
    lines = [f"note: {result.record['note']}"] if result.record.get("note") else []
    lines += ["| class | Dice | HD95 (mm) |", "|---|---|---|"]
    lines += [f"| {n} | {mean[f'dice_{n}']:.3f} | {mean[f'hd95_mm_{n}']:.1f} |" for n in result.class_names]
    lines.append(f"| mean | {mean['dice_mean']:.3f} | |")
    lines.append(f"per case: {result.per_case}; summary: {result.summary}")
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> int:
    from asfda.predict import predict_model

    print(predict_summary(predict_model(args.model, args.images, args.out, tta=args.tta, overwrite=args.overwrite,
                                        largest_component=args.largest_component, dicom_seg=args.dicom_seg,
                                        **_model_kwargs(args))))
    return 0


def predict_summary(result: dict) -> str:
    """What `asfda predict` did (`asfda.predict.predict_model`'s record): cases segmented and skipped, and where; with
    --dicom-seg, the DICOM SEG files and a note on the cases that are not DICOM series."""
    from asfda.predict import LABELS_FILE, SEG_SUFFIX

    written, skipped, out = result["written"], result["skipped"], result["out"]
    msg = f"predict: {len(written)} case{'' if len(written) == 1 else 's'} segmented"
    if skipped:
        msg += (f", {len(skipped)} skipped (outputs already up to date for weights "
                f"{result['model_weights_sha256_16']} and these settings)")
    msg += f"; label maps in {out} (values named in {out / LABELS_FILE})"
    segs, not_dicom = result.get("dicom_seg"), result.get("not_dicom")
    if segs:
        msg += f"; DICOM SEG of {len(segs)} series beside them (CASE{SEG_SUFFIX})"
    if not_dicom:
        ids = ", ".join(not_dicom[:5]) + (", ..." if len(not_dicom) > 5 else "")
        msg += (f"\nnote: --dicom-seg writes a DICOM SEG for DICOM series only: {len(not_dicom)} "
                f"case{'' if len(not_dicom) == 1 else 's'} ({ids}) got the NIfTI label map only")
    return msg


def score_command(args: argparse.Namespace) -> int:
    from asfda.query import score_dataset, score_sidecar

    meta = score_dataset(args.model, args.data, args.out, strategies=args.strategies, temperature=args.temperature,
                         seed=_project_default(args.seed, "seed"), **_model_kwargs(args))
    if meta is not None:  # None: another rank of a torchrun job (rank 0 prints)
        print(score_lines(meta, args.temperature, score_sidecar(args.out)))
    return 0


def score_lines(meta: dict, temperature: float, meta_path: os.PathLike | str) -> str:
    """What `asfda score` did (`asfda.query.score_dataset`'s record, written to ``meta_path``)."""
    lines = []
    skipped, names = meta["skipped_strategies"], meta["strategies"]
    if skipped:
        lines.append(f"note: the network has no dropout, so {skipped} were skipped (use 'tta' for a stochastic-free "
                     "uncertainty)")
    lines.append(f"scored {len(meta['ids'])} cases for {names} ({meta['scoring']['forward_passes_per_volume']} "
                 f"forward passes per volume, T={float(temperature):g}); per case: {meta['files']['csv']}; "
                 f"embeddings: {meta['files']['embeddings']}; how: {meta_path}")
    return "\n".join(lines)


def query_command(args: argparse.Namespace) -> int:
    from asfda.query import query_dataset

    run = query_dataset(args.model, args.data, _project_default(args.strategy, "strategy"), args.budget, args.out,
                        labelled=args.labelled, seed=_project_default(args.seed, "seed"),
                        temperature=args.temperature, alpha=args.alpha, round0_gap=args.round0_gap,
                        diversity=args.diversity, representativeness=args.representativeness, **_model_kwargs(args))
    if run is not None:  # None: another rank of a torchrun job (rank 0 prints)
        print(query_lines(run))
    return 0


def query_lines(run) -> str:
    """What `asfda query` picked (an `asfda.query.QueryRun`): a note on a cold start, the ids with their scores and
    components, the temperature, the pool and where the record is."""
    rec = run.record
    lines = []
    if rec["cold_start"]:
        lines.append(f"note: cold start: no model class {run.model_classes} matches a dataset label "
                     f"{run.target_classes}, so every one gets a new output channel and the {run.strategy!r} pick "
                     "reads the model's embeddings alone (fine-tuning such a model is not yet supported from the CLI: "
                     "`init` and `simulate` need at least one matching class)")
    lines.append(format_query(run))
    lines.append(f"T={rec['temperature']:.3g} ({rec['temperature_source']}); pool {rec['pool_size']}, labelled "
                 f"{len(rec['labelled'])}; written: {run.out}")
    return "\n".join(lines)


def format_query(query) -> str:
    """The chosen ids of a `asfda.selection.Query`, in pick order, with their score and components (one line each)."""
    n = len(query.ids)
    lines = [f"{query.strategy}: {n} {'case' if n == 1 else 'cases'} to annotate next"]
    for rank, (cid, score) in enumerate(zip(query.ids, query.scores), 1):
        comps = ", ".join(f"{k}={v:.4g}" for k, v in query.components.get(cid, {}).items())
        lines.append(f"{rank:3d}. {cid}  score={score:.4g}" + (f"  ({comps})" if comps else ""))
    return "\n".join(lines)
