"""The annotate-and-resume workflow of a hospital team: a project folder that asfda and the annotators share.

    asfda init --model M --pool P OUT   # once: the pretrained model, the unlabeled pool, the settings
    asfda next OUT                      # score + query; OUT/annotate/roundR/ holds what to label
    asfda ingest LABELS_DIR OUT         # check each label against its image; keep the good ones
    asfda finetune OUT                  # one round of fine-tuning on every label so far
    asfda status OUT                    # where the project stands, what to do next, and whether to stop
    asfda set OUT budget=3 ...          # change a setting (the checks of init)

Everything the project knows is in ``OUT/project.json`` (human-readable, rewritten atomically after each
step that changes it; ``project.json.bak`` is a copy of the last state asfda wrote, so restoring it after a
hand edit gone wrong never loses a finished step). Files are written before the state that names them, so
after ``kill -9`` at any point the project is at the last completed step: an accepted label is never lost (its
file is kept before it is recorded, and a re-run of ``ingest`` records it), and a round of fine-tuning is either
finished (weights, bundle and state) or redone from the previous round's weights. A lock file stops two asfda
processes from working on one project at once; the operating system releases it when a process dies.

The package, one module per job: `state` (settings, project.json, lock, checks), `setup` (init, set), `annotate`
(next, ingest), `train` (finetune), `status`.
"""

from __future__ import annotations

from .annotate import ingest_labels, next_query
from .setup import SETTING_ALIASES, init_project, update_settings
from .state import BACKUP_FILE, LOCK_FILE, PROJECT_ENTRIES, PROJECT_FILE, Project, ProjectSettings, project_lock
from .status import project_status
from .train import finetune_project

__all__ = ["BACKUP_FILE", "LOCK_FILE", "PROJECT_ENTRIES", "PROJECT_FILE", "SETTING_ALIASES", "Project",
           "ProjectSettings", "finetune_project", "ingest_labels", "init_project", "next_query", "project_lock",
           "project_status", "update_settings"]
