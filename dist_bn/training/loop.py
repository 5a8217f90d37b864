"""The data-parallel training job that `python -m dist_bn.training` runs on every rank.

`model.fit` with `dist_bn.keras`, the same on every rank:

  setup      Horovod, GPU pinning, mixed precision policy, seeds and op
             determinism; rank 0 applies the run.dir policy and saves the
             config; the model is compiled with a `DistributedOptimizer`
             (gradients averaged over ranks), and rank 0 restores the latest
             checkpoint (run.resume); `BroadcastGlobalVariablesCallback`
             gives every rank rank 0's state at the first step
  train      `fit` over one dataset of the remaining epochs (each epoch's
             order from (train.seed, epoch)), `steps_per_epoch` full global
             batches each; the learning rate is the base rate times the
             world size with a linear warmup (`schedule`)
  evaluate   `fit`'s validation after every epoch, on the held-out split in
             inference mode (moving statistics, no collective in the model):
             `MetricAverageCallback` sums the metrics' states over ranks, so
             the numbers are exact whatever the shard sizes; with
             train.precise_bn_batches > 0 precise BN runs first
  callbacks  progress, checkpoints, TensorBoard, metrics.json: `callbacks`

A resumed run gives the same results as an uninterrupted one: the data
order depends only on (train.seed, epoch), the state (weights, moving
statistics, optimizer slots and iteration count) is restored exactly, `fit`
starts at `initial_epoch`, and TensorFlow's op determinism is on.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import keras
import tensorflow as tf

import dist_bn.keras as dist_keras
from dist_bn.training import callbacks as job_callbacks
from dist_bn.training import data as data_lib
from dist_bn.training import distributed
from dist_bn.training.checkpoint import Checkpoints
from dist_bn.training.model import build_model, training_step_bytes
from dist_bn.training.report import Reporter, read_history
from dist_bn.training.rundir import (RunDirError, load_saved_config, prepare_run_dir, resolve_run_dir,
                                     resume_conflicts, save_config)
from dist_bn.training.schedule import make_schedule


class SetupError(Exception):
    """The job cannot start as configured; the message says what to change."""


# What a rank holds besides a training step: TensorFlow, Horovod, tf.data and
# the model's variables. One-process runs of the tests' tiny config and of
# configs/demo.yaml peaked at 0.54 and 0.56 GB resident on CPU, nearly all this.
RANK_BASE_BYTES = 512 * 2**20
GIB = 2**30


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_problem(config: Mapping[str, Any], ranks_here: int, available: int | None) -> str | None:
    """Why `ranks_here` ranks of `config` will not fit in `available` bytes
    (estimated: `model.training_step_bytes`, the epoch's index permutation and
    RANK_BASE_BYTES per rank), else None."""
    if available is None:
        return None
    data, train = config["data"], config["train"]
    step = training_step_bytes(config["model"], data, max(train["batch_size"], data_lib.MIN_EVAL_BATCH))
    per_rank = RANK_BASE_BYTES + step + 8 * (data["train_clips"] + data["eval_clips"])
    if per_rank * ranks_here <= available:
        return None
    return (f"data/model/train sizes: a rank would need about {per_rank / GIB:.1f} GiB "
            f"({data['frames']}x{data['height']}x{data['width']} clips, batch {train['batch_size']}, "
            f"model.width {config['model']['width']}, model.depth {config['model']['depth']}), x {ranks_here} "
            f"rank(s) on this machine = {per_rank * ranks_here / GIB:.1f} GiB, but only "
            f"{available / GIB:.1f} GiB is available; lower data.height/data.width/data.frames, "
            "train.batch_size or model.width, or use fewer ranks per machine")


def make_optimizer(train: Mapping[str, Any], schedule, mixed_precision: bool) -> keras.optimizers.Optimizer:
    """SGD with momentum or Adam (beta_1 = train.momentum), loss-scaled under
    mixed precision, its gradients averaged over ranks (`DistributedOptimizer`
    outside the loss scaling, so every rank takes the same finite-check branch)."""
    if train["optimizer"] == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=train["momentum"])
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule, beta_1=train["momentum"])
    if mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return dist_keras.DistributedOptimizer(optimizer)


def _prepare_run_dir(config: Mapping[str, Any], world: distributed.World) -> tuple[Path, Path | None]:
    """Rank 0 applies the run.dir policy; every rank learns the outcome, so
    they all stop together (with the same message) when it fails."""
    run = config["run"]
    run_dir = resolve_run_dir(run["dir"])
    outcome: tuple[str | None, str | None] = (None, None)
    if world.is_chief:
        try:
            moved = prepare_run_dir(run_dir, run["resume"], run["overwrite"])
            conflicts = resume_conflicts(load_saved_config(run_dir), config) if run["resume"] else []
            if conflicts:
                raise RunDirError(
                    f"{run_dir} holds a run with other model/data settings ({'; '.join(conflicts)}); "
                    "resume it with its own settings (see its config.yaml) or pick another run.dir")
            save_config(run_dir, config)
            outcome = (str(moved) if moved else None, None)
        except (RunDirError, OSError) as err:
            outcome = (None, f"run.dir: {err}")
    moved, problem = distributed.broadcast_object(outcome, name="setup/run_dir")
    if problem:
        raise SetupError(problem)
    return run_dir, Path(moved) if moved else None


class Trainer:
    """One rank's compiled model, optimizer and datasets (checked against the world size first)."""

    def __init__(self, config: Mapping[str, Any], world: distributed.World):
        self.config = config
        self.world = world
        data, train = config["data"], config["train"]
        self.steps = data_lib.steps_per_epoch(data, train["batch_size"], world.size)
        self.global_batch = train["batch_size"] * world.size
        if self.steps == 0:
            raise SetupError(
                f"train.batch_size: one global batch ({train['batch_size']} clips x {world.size} ranks = "
                f"{self.global_batch}) is larger than data.train_clips ({data['train_clips']}); "
                "lower train.batch_size or raise data.train_clips")
        problem = memory_problem(config, world.local_size, available_memory())
        if problem:
            raise SetupError(problem)
        self.model = build_model(config["model"], data)
        self.schedule = make_schedule(train, world.size, self.steps)
        self.optimizer = make_optimizer(train, self.schedule, train["mixed_precision"])
        self.optimizer.build(self.model.trainable_variables)  # its slots exist before a restore
        # Horovod's ops have no XLA kernels: no jit_compile.
        self.model.compile(optimizer=self.optimizer,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                           jit_compile=False)
        # One compiled training step, as fit runs it (dist-bn-bench times it).
        self.train_step = tf.function(lambda clips, labels: self.model.train_step((clips, labels)))

    def learning_rate(self) -> float:
        return float(self.schedule(self.optimizer.iterations))


class Job:
    """What the callbacks share: the trainer's model and sizes, the run
    directory, the reporter, the checkpoints and the epoch history."""

    def __init__(self, trainer: Trainer, run_dir: Path, reporter: Reporter, started: float):
        self.trainer, self.config, self.world = trainer, trainer.config, trainer.world
        self.steps, self.global_batch, self.learning_rate = trainer.steps, trainer.global_batch, trainer.learning_rate
        self.run_dir, self.reporter, self.started = run_dir, reporter, started
        self.checkpoints = Checkpoints(run_dir, trainer.model, trainer.optimizer, self.world)
        self.history: list[dict] = []
        self.resumed_from = 0
        self.report = job_callbacks.EpochReport(self)

    def metrics(self, last_eval: Mapping[str, Any], complete: bool) -> dict[str, Any]:
        """metrics.json: final (or latest) evaluation, run facts, and per-epoch history.

        wall_time_s and clips_per_s cover this session only (a resumed run's
        earlier sessions are in the history's epoch_time_s)."""
        last = self.history[-1] if self.history else {}
        train_time, trained = self.report.train_time, self.report.trained_epochs
        return {
            "eval_accuracy": last_eval["eval_accuracy"],
            "eval_loss": last_eval["eval_loss"],
            "eval_clips": last_eval["eval_clips"],
            "train_loss": last.get("train_loss"),
            "train_accuracy": last.get("train_accuracy"),
            "epochs": max(self.resumed_from, last.get("epoch", 0)),
            "world_size": self.world.size,
            "batch_size_per_rank": self.config["train"]["batch_size"],
            "global_batch_size": self.global_batch,
            "steps_per_epoch": self.steps,
            "bn": self.config["model"]["bn"],
            "resumed_from_epoch": self.resumed_from,
            "wall_time_s": time.perf_counter() - self.started,
            "train_time_s": train_time,
            "clips_per_s": trained * self.steps * self.global_batch / train_time if train_time > 0 else None,
            "complete": complete,
            "history": self.history,
        }


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train and evaluate as `config` says, on this rank; returns the final
    metrics (the same dict on every rank; rank 0 also writes it)."""
    started = time.perf_counter()
    world = distributed.init()
    train = config["train"]
    if train["mixed_precision"]:
        if not tf.config.list_logical_devices("GPU"):
            raise SetupError(
                "train.mixed_precision: float16 compute needs a GPU, and this rank has none "
                "(TensorFlow has no float16 CPU kernel for MaxPool3D, and float16 is slower than "
                "float32 on CPUs anyway); set train.mixed_precision=false")
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(train["seed"])
    tf.config.experimental.enable_op_determinism()
    # The training data has exactly the steps fit takes; only an empty evaluation
    # shard (more ranks than data.eval_clips) "runs out", and that is fine.
    warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)

    trainer = Trainer(config, world)  # checks the config against the world size first
    run_dir, moved = _prepare_run_dir(config, world)
    reporter = Reporter(run_dir, world.is_chief)
    try:
        return _train_and_evaluate(Job(trainer, run_dir, reporter, started), moved)
    finally:
        reporter.close()


def _resume(job: Job) -> None:
    """run.resume: rank 0 restores the newest intact checkpoint, every rank learns its epoch."""
    resumed = job.checkpoints.restore_latest()
    for note in resumed.notes:
        job.reporter.warn(f"run.resume: {note}")
    if resumed.path:
        job.resumed_from = resumed.epoch
        job.reporter.say(f"resumed from {resumed.path} (epoch {resumed.epoch} done)")
        if job.world.is_chief:
            job.history = read_history(job.run_dir, resumed.epoch)
    else:
        job.reporter.say(f"run.resume: no checkpoint in {job.checkpoints.directory}; starting from scratch")


def _train_and_evaluate(job: Job, moved: Path | None) -> dict[str, Any]:
    config, world, model = job.config, job.world, job.trainer.model
    train = config["train"]
    if moved:
        job.reporter.say(f"run.overwrite: moved the earlier run in {job.run_dir} to {moved}")
    if config["run"]["resume"]:
        _resume(job)
    job.reporter.say(
        f"{model.name}: {model.count_params():,} parameters, bn={config['model']['bn']}, "
        f"{world.size} rank(s) x {train['batch_size']} clips = global batch {job.global_batch}, "
        f"{job.steps} steps/epoch, lr {train['learning_rate']} x {world.size} = {job.trainer.schedule.peak:g} "
        f"after {job.trainer.schedule.warmup_steps} warmup steps, {train['optimizer']}"
        f"{', mixed_float16' if train['mixed_precision'] else ''}")
    job.reporter.say(f"run dir {job.run_dir}")

    eval_data = data_lib.eval_dataset(config, world.rank, world.size)
    done = job.resumed_from
    if done < train["epochs"]:
        model.fit(data_lib.train_dataset(config, done + 1, world.rank, world.size, train["epochs"]),
                            epochs=train["epochs"], initial_epoch=done, steps_per_epoch=job.steps,
                            validation_data=eval_data, callbacks=job_callbacks.callbacks(job), verbose=0)
        last_eval = job.history[-1]  # exact over ranks (Keras's History may hold rank-local values)
    else:  # nothing left to train (resumed a finished run): evaluate what was restored, on every rank
        dist_keras.broadcast_global_variables(model)
        last_eval = job_callbacks.eval_record(dist_keras.evaluate(model, eval_data, verbose=0, return_dict=True),
                                              config, prefix="")
    metrics = job.metrics(last_eval, complete=True)
    job.reporter.metrics(metrics)
    job.reporter.say(f"final eval: accuracy {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f} "
                     f"on {metrics['eval_clips']} clips after {metrics['epochs']} epoch(s); "
                     f"wall time {metrics['wall_time_s']:.1f}s, {_speed(metrics['clips_per_s'])}; "
                     f"metrics in {job.run_dir / 'metrics.json'}")
    return metrics


def _speed(clips_per_s: float | None) -> str:
    return "no training in this session" if clips_per_s is None else f"{clips_per_s:.1f} clips/s"
