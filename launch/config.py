"""Load the whole config file for the launcher: `dist_bn.config.load_config`
with `launch.schema.SCHEMA` (the job's sections and the launcher's).

The launcher calls `load_config` before it starts anything; every rank of the
training job reads the same file and overrides again, its own sections only
(`dist_bn.training.schema.load_config`), with the same checks and messages.
Checks that depend on the launching machine live in `launch.preflight`.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from dist_bn.config import ConfigError, format_override, parse_override  # noqa: F401
from dist_bn.config import load_config as load_with_schema
from dist_bn.config.loader import OVERRIDE_SOURCE  # noqa: F401
from launch.schema import SCHEMA

Config = dict[str, dict[str, Any]]


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The whole config at `path` with `overrides` ('key.path=value', in order),
    every key and rule checked, defaults filled in. Raises ConfigError."""
    return load_with_schema(path, overrides, SCHEMA)
