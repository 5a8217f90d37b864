"""The training job's config sections (model, data, train, run): keys, types,
defaults, docs, and the rules between them.

The job owns these; the launcher (`launch.schema`) adds its own sections and
checks the whole file with both. `load_config` is how every rank reads its
config: the job's sections checked, the launcher's (`LAUNCHER_SECTIONS`)
accepted and left to the launcher, so the same file serves both.
"""
from __future__ import annotations

import os
from typing import Iterable

from dist_bn.config import Field, Rule, Schema
from dist_bn.config import load_config as load_with_schema
from dist_bn.config.values import Bool, Choice, Float, Int, Text

SECTIONS: dict[str, str] = {
    "model": "the network the training job builds",
    "data": "the synthetic video-clip data set",
    "train": "optimization and logging",
    "run": "where results go and what to do with an existing run",
}
# Sections the same file holds for dist-bn-launch (launch.schema checks them).
LAUNCHER_SECTIONS = ("launcher", "horovod", "cluster", "slurm", "k8s")

FIELDS: tuple[Field, ...] = (
    # model
    Field("model.width", Int(1, 65536), 16, "Channels of the first Conv3D block."),
    Field("model.depth", Int(1, 64), 3, "Number of Conv3D-BN-ReLU blocks; channels double per block."),
    Field("model.bn", Choice(("sync", "local", "none")), "sync",
          "Batch norm: sync = exact statistics over all ranks, local = per-rank Keras BN, none = no BN."),
    Field("model.momentum", Float(0, 1, min_open=True, max_open=True), 0.9, "BN moving-average momentum."),
    # data
    Field("data.frames", Int(2, 65536), 8, "Frames per clip."),
    Field("data.height", Int(8, 65536), 32, "Frame height in pixels."),
    Field("data.width", Int(8, 65536), 32, "Frame width in pixels."),
    Field("data.num_classes", Int(2, 65536), 4, "Number of classes."),
    Field("data.train_clips", Int(1, 2**31 - 1), 2048, "Training clips in total (split across ranks)."),
    Field("data.eval_clips", Int(1, 2**31 - 1), 512, "Evaluation clips in total (split across ranks)."),
    Field("data.seed", Int(-2**63, 2**63 - 1), 0, "Seed of the synthetic data set."),
    # train
    Field("train.batch_size", Int(1, 65536), 4, "Clips per rank per step (global batch = batch_size x ranks)."),
    Field("train.epochs", Int(1, 1_000_000), 3, "Training epochs."),
    Field("train.learning_rate", Float(0, min_open=True), 0.01,
          "Per-rank base learning rate; the job scales it by the number of ranks."),
    Field("train.warmup_epochs", Float(0), 1.0, "Epochs of linear learning-rate warmup."),
    Field("train.optimizer", Choice(("sgd", "adam")), "sgd", "Optimizer."),
    Field("train.momentum", Float(0, 1, max_open=True), 0.9, "SGD momentum (adam: beta_1)."),
    Field("train.mixed_precision", Bool(), False, "Compute in float16 (mixed_float16 policy); for GPUs."),
    Field("train.seed", Int(0, 2**32 - 1), 0, "Seed for weights and shuffling."),
    Field("train.log_every", Int(1, 2**31 - 1), 10, "Log metrics every this many steps."),
    Field("train.checkpoint_every", Int(1, 1_000_000), 1, "Write a checkpoint every this many epochs."),
    Field("train.precise_bn_batches", Int(0, 1_000_000), 0,
          "Precise BN: before each evaluation (so also before each checkpoint) set every BN layer's moving "
          "statistics to the exact population statistics over this many global training batches; 0 = off."),
    # run
    Field("run.dir", Text("path"), "runs/demo",
          "Run directory (checkpoints, logs); relative to the current directory."),
    Field("run.resume", Bool(), False, "Continue the run found in run.dir."),
    Field("run.overwrite", Bool(), False, "Replace an existing non-empty run.dir."),
    Field("run.tensorboard", Bool(), True, "Write TensorBoard logs under run.dir."),
)


def resume_or_overwrite_problem(resume: bool, overwrite: bool) -> str | None:
    """The one rule between run.resume and run.overwrite (also `rundir`'s first check)."""
    if resume and overwrite:
        return "run.resume and run.overwrite are both true; pick one"
    return None


def _resume_or_overwrite(c):
    return resume_or_overwrite_problem(c["run"]["resume"], c["run"]["overwrite"])


RULES: tuple[Rule, ...] = (
    Rule(("run.overwrite", "run.resume"), "`run.resume` and `run.overwrite` exclude each other.",
         _resume_or_overwrite),
)

SCHEMA = Schema(SECTIONS, FIELDS, RULES, foreign=LAUNCHER_SECTIONS)


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """The job's sections of the config at `path` with `overrides`, checked and
    filled with defaults (raises dist_bn.config.ConfigError)."""
    return load_with_schema(path, overrides, SCHEMA)
