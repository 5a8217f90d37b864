"""Launcher for dist_bn training jobs.

`dist-bn-launch CONFIG.yaml [key.path=value ...] [--dry-run]` validates the
config against one schema (`launch.schema`), then starts the training job on
every rank with horovodrun or mpirun. The training job loads the same config
with `launch.config.load_config`. `dist-bn-launch verify CONFIG.yaml` runs
dist-bn-verify on every rank instead, and `--emit slurm|k8s-mpijob` writes a
Slurm batch script or a Kubeflow MPIJob for the config (`launch.emit`).
"""
from launch.config import ConfigError, load_config

__all__ = ["ConfigError", "load_config"]
