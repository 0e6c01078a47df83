"""The Accelerator of a recipe run, built from its :class:`~robustvit.configs.RunConfig`.

Example:
    >>> from robustvit.configs import RunConfig
    >>> run = RunConfig(output_dir="outputs/run", cpu=True, gradient_accumulation_steps=2)
    >>> accelerator = build_accelerator(run, "demo", {"run": run})
    >>> accelerator.gradient_accumulation_steps, accelerator.project_configuration.automatic_checkpoint_naming
    (2, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from robustvit.training.checkpoint import project_configuration

__all__ = ["build_accelerator", "flat_config"]


def flat_config(configs: dict[str, Any]) -> dict[str, Any]:
    """``{"run": RunConfig(...), ...}`` -> ``{"run/seed": 0, ...}`` with scalar values, as trackers take them.

    Example:
        >>> flat_config({"eval": {"eps": [0.1, 0.2], "pgd_steps": 50, "max_eval_images": None}})
        {'eval/eps': '[0.1, 0.2]', 'eval/pgd_steps': 50, 'eval/max_eval_images': 'None'}
    """
    flat = {}
    for section, config in configs.items():
        values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        for key, value in values.items():
            scalar = isinstance(value, bool | int | float | str)
            flat[f"{section}/{key}"] = value if scalar else str(value)
    return flat


def build_accelerator(run: Any, project_name: str, configs: dict[str, Any]) -> Accelerator:
    """An Accelerator for ``run`` (a :class:`~robustvit.configs.RunConfig`), seeded, with its trackers started.

    Mixed precision, gradient accumulation, numbered checkpoints under ``run.output_dir`` (newest
    ``run.checkpoints_total_limit`` kept) and, with ``run.with_tracking``, the trackers of ``run.report_to``
    (started with ``flat_config(configs)`` as hyper-parameters, logging under ``run.output_dir``).
    """
    accelerator = Accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=run.report_to if run.with_tracking else None,
        project_config=project_configuration(run.output_dir, run.checkpoints_total_limit),
    )
    set_seed(run.seed)
    if run.with_tracking:
        accelerator.init_trackers(project_name, config=flat_config(configs))
    return accelerator
