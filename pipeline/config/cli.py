"""The configuration arguments every job shares, and how a job reports a configuration it refuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

# Documented in every job's docstring: the configuration was refused and nothing was started.
CONFIG_ERROR_EXIT = 2


def add_config_arguments(
    parser: argparse.ArgumentParser, *, set_example: str, presets: Iterable[str] = (), default_preset: str | None = None
) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.sets``) and ``--address``; ``--config`` when the job has presets.

    ``set_example`` is one or two ``key=value`` pairs shown in the help, e.g. ``"train.steps=200"``.
    """
    presets = list(presets)
    if presets:
        parser.add_argument("--config", default=default_preset, help=f"preset: {', '.join(presets)}")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"change one setting, e.g. --set {set_example} (repeatable; lists as a,b or [a,b]; null clears)",
    )
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else start or join a local Ray)")


def refuse(job: str, exc: ValueError) -> int:
    """Print why ``job``'s configuration was refused and return the exit code that says so."""
    print(f"{job}: {exc}", file=sys.stderr)
    return CONFIG_ERROR_EXIT
