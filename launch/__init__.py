"""Launcher for dist_bn training jobs.

`dist-bn-launch CONFIG.yaml [key.path=value ...] [--dry-run]` validates the
config against one schema (`launch.schema`), then starts the training job on
every rank with horovodrun or mpirun. The training job loads the same config
with `launch.config.load_config`.
"""
from launch.config import ConfigError, load_config

__all__ = ["ConfigError", "load_config"]
