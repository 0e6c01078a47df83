"""Building blocks of the training recipes (``recipes/*.py``), one concern per module.

* :mod:`~robustvit.training.models`: :func:`load_model` (a registry of model sources: the embedded default, timm,
  transformers), :class:`PixelModel` (pixels in ``[0, 1]``, normalization inside), :func:`set_drop_path`;
* :mod:`~robustvit.training.loop`: :func:`train_epoch` (Accelerate's gradient accumulation, progress with totals),
  :func:`train_phase` (epochs, checkpoints, resume, trackers) and :func:`cosine_schedule` (transformers');
* :mod:`~robustvit.training.checkpoint`: Accelerate's numbered checkpoints with a JSON training state, resume, and
  output folders that are never silently overwritten;
* :mod:`~robustvit.training.run`: :func:`build_accelerator`, the Accelerator of a recipe's ``RunConfig``.

The recipes' settings are the dataclasses of :mod:`robustvit.configs`.

Example:
    >>> model, description = load_model(None, num_classes=10, image_size=32, channels=3)
    >>> net = PixelModel(model)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from robustvit.training.checkpoint import (
    CHECKPOINTS_DIR,
    RUN_SETTINGS_FILE,
    TRAINING_STATE_FILE,
    SamplerGenerator,
    check_run_settings,
    finish,
    latest_checkpoint,
    prepare_output_dir,
    project_configuration,
    resume_from_checkpoint,
    save_checkpoint,
    use_project_dir,
)
from robustvit.training.loop import (
    cosine_schedule,
    epoch_batches,
    progress_bar,
    train_epoch,
    train_phase,
)
from robustvit.training.models import (
    DEFAULT_MODEL,
    MODEL_SOURCES,
    ModelSource,
    PixelModel,
    load_model,
    save_model_folder,
    set_drop_path,
)
from robustvit.training.run import (
    build_accelerator,
    flat_config,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "DEFAULT_MODEL",
    "MODEL_SOURCES",
    "ModelSource",
    "PixelModel",
    "RUN_SETTINGS_FILE",
    "SamplerGenerator",
    "TRAINING_STATE_FILE",
    "build_accelerator",
    "check_run_settings",
    "cosine_schedule",
    "epoch_batches",
    "finish",
    "flat_config",
    "latest_checkpoint",
    "load_model",
    "prepare_output_dir",
    "progress_bar",
    "project_configuration",
    "resume_from_checkpoint",
    "save_checkpoint",
    "save_model_folder",
    "set_drop_path",
    "train_epoch",
    "train_phase",
    "use_project_dir",
]
