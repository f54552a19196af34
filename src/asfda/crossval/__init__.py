"""Cross-validation of active adaptation on a labelled dataset (``asfda crossval``): every labelled volume is a test
volume exactly once, each fold runs `asfda.simulate.run_simulation` with the fold's other volumes as the pool, and the
summary says per strategy how the mean Dice grows with the number labelled, and by how much (with a bootstrap
interval over test volumes) it beats random.

`folds` (assignment, fold datasets of symlinks), `run` (the folds through run_simulation, the whole), `read` (fold
folders read back, the post-processing choice), `summary` (the numbers), `stats` (AUC, paired bootstrap), `report`
(summary.json, README.md, learning_curve.png, report.html)."""

from asfda.crossval.folds import fold_assignment, fold_datasets_root, make_fold_datasets
from asfda.crossval.run import crossval, plan_seeds, run_fold, summarize_folder
from asfda.crossval.stats import bootstrap_mean, curve_auc, paired_difference
from asfda.crossval.summary import summarize

__all__ = ["bootstrap_mean", "crossval", "curve_auc", "fold_assignment", "fold_datasets_root", "make_fold_datasets",
           "paired_difference", "plan_seeds", "run_fold", "summarize", "summarize_folder"]
