"""Typed configuration of every job, validated before Ray starts.

- ``overrides``: the one ``--set key=value`` grammar (values typed by the field they set), ``ConfigError``, and
  the one way validation errors become messages that name the field and say what to do.
- ``pretrain``: ``PretrainConfig`` and the ``RunLayout`` derived from it and the data.
- ``presets``: named pretraining presets (typed functions) and ``load_config(preset, overrides)``.
- ``transfer``: ``TransferConfig`` of a transfer sweep and ``build_config(fields, sets)``; import it from
  ``pipeline.config.transfer`` (it needs the benchmark registry, which the pretraining side does not).
- ``cli``: ``--config/--set/--address`` for a job's argument parser, and the exit code of a refused config.
- ``paths``: where runs/ is by default (the checkout, or ``$VITPIPE_HOME``).
"""

from pipeline.config.overrides import ConfigError, apply_overrides, format_errors, parse_override, read_value
from pipeline.config.paths import (
    HOME_ENV,
    REPO_ROOT,
    default_runs_root,
    default_tracking_uri,
    home_dir,
    in_ray_job_copy,
)
from pipeline.config.presets import load_config
from pipeline.config.pretrain import PretrainConfig, RunLayout, check_durable_defaults, flatten, make_layout

__all__ = [
    "HOME_ENV",
    "REPO_ROOT",
    "ConfigError",
    "PretrainConfig",
    "RunLayout",
    "apply_overrides",
    "check_durable_defaults",
    "default_runs_root",
    "default_tracking_uri",
    "flatten",
    "format_errors",
    "home_dir",
    "in_ray_job_copy",
    "load_config",
    "make_layout",
    "parse_override",
    "read_value",
]
