"""The recipes' workflows: the phases ``recipes/train_lipschitz.py`` and ``recipes/finetune_nullspace.py`` call, one
module each, over what they share (:mod:`~robustvit.workflows.phases`). ``bench/`` runs the same functions.

* :mod:`~robustvit.workflows.phases`: starting a run, its splits and model, training epochs, the cross-entropy
  pretraining, and a phase saved once complete behind a finished marker (:func:`done_once`);
* :mod:`~robustvit.workflows.lipschitz_training`: build, pretrain the source, convert, margin training, certify and
  save;
* :mod:`~robustvit.workflows.nullspace_finetuning`: build, pretrain the baseline, finetune each method and seed,
  evaluate, report.
"""

from robustvit.workflows.phases import (
    Trainer,
    cross_entropy,
    done_once,
    load_source_model,
    load_splits,
    pretrain,
    start_run,
    train_epochs,
)

__all__ = [
    "Trainer",
    "cross_entropy",
    "done_once",
    "load_source_model",
    "load_splits",
    "pretrain",
    "start_run",
    "train_epochs",
]
