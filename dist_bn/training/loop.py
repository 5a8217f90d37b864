"""The data-parallel training job that `python -m dist_bn.training` runs on every rank.

One custom loop, the same on every rank, with Horovod's TensorFlow core ops:

  setup      Horovod, GPU pinning, mixed precision policy, seeds and op
             determinism; rank 0 applies the run.dir policy and saves the
             config; model and optimizer are built, then either restored
             from the latest checkpoint (run.resume) or broadcast from
             rank 0, so every rank starts from identical state
  train      a `tf.function` step: forward in training mode, gradients
             averaged over ranks by `hvd.DistributedGradientTape`, one
             optimizer update; the learning rate is the base rate times
             the world size with a linear warmup (`schedule`)
  log        every train.log_every steps loss/accuracy summed over ranks,
             printed by rank 0 with the speed of all ranks together
  precise BN with train.precise_bn_batches > 0, before each evaluation:
             every BN layer's moving statistics become the exact
             population statistics of that many global training batches
             (`dist_bn.precise_bn`), so evaluation and checkpoints use them
  evaluate   after every epoch, on the held-out split in inference mode
             (moving statistics, no collective in the model); loss sums
             and correct counts are summed over ranks, so the numbers are
             exact whatever the shard sizes
  checkpoint every train.checkpoint_every epochs and after the last one

A resumed run gives the same results as an uninterrupted one: the data
order depends only on (train.seed, epoch), the state (weights, moving
statistics, optimizer slots and iteration count) is restored exactly, and
TensorFlow's op determinism is on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf

from dist_bn.precise_bn import precise_bn
from dist_bn.training import data as data_lib
from dist_bn.training import distributed
from dist_bn.training.checkpoint import Checkpoints
from dist_bn.training.model import build_model, training_step_bytes
from dist_bn.training.report import Reporter, epoch_line, progress_line, read_history
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
    """SGD with momentum or Adam (beta_1 = train.momentum), loss-scaled under mixed precision."""
    if train["optimizer"] == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=train["momentum"])
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule, beta_1=train["momentum"])
    if mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
    """Model, optimizer, compiled steps and datasets of one rank."""

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
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

        clip_shape = [data["frames"], data["height"], data["width"], 1]
        batch = train["batch_size"]
        self.train_step = tf.function(self._train_step, input_signature=[
            tf.TensorSpec([batch, *clip_shape], tf.float32), tf.TensorSpec([batch], tf.int32)])
        self.eval_step = tf.function(self._eval_step, input_signature=[
            tf.TensorSpec([None, *clip_shape], tf.float32), tf.TensorSpec([None], tf.int32)])

    def _train_step(self, clips, labels):
        """One synchronous step; returns this rank's (loss sum, correct count)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(clips, training=True)
            losses = self.loss_fn(labels, logits)
            loss = tf.reduce_mean(losses)
            scaled = self.optimizer.scale_loss(loss)
        tape = distributed.distributed_tape(tape)
        grads = tape.gradient(scaled, [v.value for v in variables])
        self.optimizer.apply_gradients(zip(grads, variables))
        return tf.reduce_sum(losses), _correct(logits, labels)

    def _eval_step(self, clips, labels):
        logits = self.model(clips, training=False)
        losses = tf.cast(self.loss_fn(labels, logits), tf.float64)
        return tf.reduce_sum(losses), _correct(logits, labels)

    def learning_rate(self) -> float:
        return float(self.schedule(self.optimizer.iterations))

    def compile_steps(self) -> None:
        """Trace both steps now, so that tracing does not count as training time."""
        self.train_step.get_concrete_function()
        self.eval_step.get_concrete_function()

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy over the whole evaluation split, exact over ranks."""
        sums = np.zeros(3)
        batches = iter(data_lib.eval_dataset(self.config, self.world.rank, self.world.size))
        for _ in range(data_lib.eval_batches(self.config, self.world.rank, self.world.size)):
            clips, labels = next(batches)
            loss_sum, correct = self.eval_step(clips, labels)
            sums += (float(loss_sum), float(correct), int(labels.shape[0]))
        loss_sum, correct, count = distributed.allreduce_sum(sums, name="eval/sums")
        return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1),
                "eval_clips": int(count)}

    def precise_bn(self, epoch: int) -> str:
        """Precise BN over train.precise_bn_batches global batches of `epoch`'s
        training order (repeated if it asks for more than an epoch); returns a log line."""
        batches = self.config["train"]["precise_bn_batches"]
        start = time.perf_counter()
        dataset = data_lib.train_dataset(self.config, epoch, self.world.rank, self.world.size).repeat()
        counts = precise_bn(self.model, dataset, batches)
        return (f"precise BN: {len(counts)} layer(s) over {batches} global batches "
                f"({batches * self.global_batch} clips) in {time.perf_counter() - start:.1f}s")

    def share_model_state(self) -> None:
        """Make every rank hold rank 0's non-trainable state (BN moving
        statistics). With sync BN (or none) it is identical on every rank
        already; with local BN each rank averaged its own batches, and
        evaluation and checkpoints then use rank 0's, the model it saves."""
        if self.config["model"]["bn"] == "local" and self.world.size > 1:
            distributed.broadcast_variables(self.model.non_trainable_variables, prefix="share")


def _correct(logits, labels):
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int64))


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train and evaluate as `config` says, on this rank; returns the final
    metrics (the same dict on every rank; rank 0 also writes it)."""
    started = time.perf_counter()
    world = distributed.init()
    train, run_cfg = config["train"], config["run"]
    if train["mixed_precision"]:
        if not tf.config.list_logical_devices("GPU"):
            raise SetupError(
                "train.mixed_precision: float16 compute needs a GPU, and this rank has none "
                "(TensorFlow has no float16 CPU kernel for MaxPool3D, and float16 is slower than "
                "float32 on CPUs anyway); set train.mixed_precision=false")
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(train["seed"])
    tf.config.experimental.enable_op_determinism()

    trainer = Trainer(config, world)  # checks the config against the world size first
    run_dir, moved = _prepare_run_dir(config, world)
    reporter = Reporter(run_dir, world.is_chief, run_cfg["tensorboard"])
    try:
        return _train_and_evaluate(config, world, trainer, run_dir, moved, reporter, started)
    finally:
        reporter.close()


def _train_and_evaluate(config, world, trainer, run_dir, moved, reporter, started) -> dict[str, Any]:
    train, run_cfg = config["train"], config["run"]
    epochs, steps, log_every = train["epochs"], trainer.steps, train["log_every"]
    if moved:
        reporter.say(f"run.overwrite: moved the earlier run in {run_dir} to {moved}")

    checkpoints = Checkpoints(run_dir, trainer.model, trainer.optimizer, world)
    done, restored = (0, None)
    if run_cfg["resume"]:
        resumed = checkpoints.restore_latest()
        done, restored = resumed.epoch, resumed.path
        for note in resumed.notes:
            reporter.warn(f"run.resume: {note}")
        if restored:
            reporter.say(f"resumed from {restored} (epoch {done} done)")
        else:
            reporter.say(f"run.resume: no checkpoint in {checkpoints.directory}; starting from scratch")
    if not restored:
        distributed.broadcast_variables(checkpoints.state_variables(), prefix="init")
    history = read_history(run_dir, done) if restored and world.is_chief else []

    model = trainer.model
    reporter.say(
        f"{model.name}: {model.count_params():,} parameters, bn={config['model']['bn']}, "
        f"{world.size} rank(s) x {train['batch_size']} clips = global batch {trainer.global_batch}, "
        f"{steps} steps/epoch, lr {train['learning_rate']} x {world.size} = {trainer.schedule.peak:g} "
        f"after {trainer.schedule.warmup_steps} warmup steps, {train['optimizer']}"
        f"{', mixed_float16' if train['mixed_precision'] else ''}")
    reporter.say(f"run dir {run_dir}")
    trainer.compile_steps()

    train_time, train_clips, last_eval = 0.0, 0, None
    for epoch in range(done + 1, epochs + 1):
        epoch_start = time.perf_counter()
        window, totals = np.zeros(3), np.zeros(3)  # loss sum, correct, clips
        window_start = epoch_start
        # Exactly `steps` batches are taken and the iterator is never asked for
        # more: reaching the end of a tf.data pipeline can stall for seconds
        # when ranks share few cores, and the other ranks would wait.
        batches = iter(data_lib.train_dataset(config, epoch, world.rank, world.size))
        for step in range(1, steps + 1):
            clips, labels = next(batches)
            loss_sum, correct = trainer.train_step(clips, labels)
            window += (float(loss_sum), float(correct), train["batch_size"])
            if step % log_every == 0 or step == steps:
                summed = distributed.allreduce_sum(window, name="train/window")
                totals += summed
                now = time.perf_counter()
                speed = summed[2] / max(now - window_start, 1e-9)
                lr = trainer.learning_rate()
                reporter.say(progress_line(epoch, epochs, step, steps, summed[0] / summed[2],
                                           summed[1] / summed[2], lr, speed))
                global_step = (epoch - 1) * steps + step
                reporter.scalars({"train/loss": summed[0] / summed[2], "train/accuracy": summed[1] / summed[2],
                                  "train/learning_rate": lr, "train/clips_per_s": speed}, global_step)
                window, window_start = np.zeros(3), now
        epoch_train_time = time.perf_counter() - epoch_start
        train_time += epoch_train_time
        train_clips += steps * trainer.global_batch

        if train["precise_bn_batches"]:
            reporter.say(trainer.precise_bn(epoch))
        trainer.share_model_state()
        last_eval = trainer.evaluate()
        record = {"epoch": epoch, "train_loss": totals[0] / totals[2], "train_accuracy": totals[1] / totals[2],
                  **last_eval, "learning_rate": trainer.learning_rate(),
                  "epoch_time_s": time.perf_counter() - epoch_start,
                  "clips_per_s": steps * trainer.global_batch / epoch_train_time}
        history.append(record)
        reporter.say(epoch_line(record, epochs))
        reporter.scalars({f"epoch/{k}": record[k] for k in
                          ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy")}, epoch)
        if epoch % train["checkpoint_every"] == 0 or epoch == epochs:
            path = checkpoints.save(epoch)
            if path:
                reporter.say(f"checkpoint {path}")
        reporter.metrics(_metrics(config, world, trainer, history, last_eval, started, train_time,
                                  train_clips, done, epoch, complete=False))

    if last_eval is None:  # nothing left to train (resumed a finished run): evaluate what was restored
        trainer.share_model_state()
        last_eval = trainer.evaluate()
    metrics = _metrics(config, world, trainer, history, last_eval, started, train_time, train_clips, done,
                       max(done, epochs), complete=True)
    reporter.metrics(metrics)
    reporter.say(f"final eval: accuracy {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f} "
                 f"on {metrics['eval_clips']} clips after {metrics['epochs']} epoch(s); "
                 f"wall time {metrics['wall_time_s']:.1f}s, {_speed(metrics['clips_per_s'])}; "
                 f"metrics in {run_dir / 'metrics.json'}")
    return metrics


def _speed(clips_per_s: float | None) -> str:
    return "no training in this session" if clips_per_s is None else f"{clips_per_s:.1f} clips/s"


def _metrics(config, world, trainer, history, last_eval, started, train_time, train_clips, resumed_from,
             completed, complete) -> dict[str, Any]:
    """metrics.json: final (or latest) evaluation, run facts, and per-epoch history.

    wall_time_s and clips_per_s cover this session only (a resumed run's
    earlier sessions are in the history's epoch_time_s)."""
    last = history[-1] if history and history[-1]["epoch"] == completed else {}
    return {
        "eval_accuracy": last_eval["eval_accuracy"],
        "eval_loss": last_eval["eval_loss"],
        "eval_clips": last_eval["eval_clips"],
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": completed,
        "world_size": world.size,
        "batch_size_per_rank": config["train"]["batch_size"],
        "global_batch_size": trainer.global_batch,
        "steps_per_epoch": trainer.steps,
        "bn": config["model"]["bn"],
        "resumed_from_epoch": resumed_from,
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": train_time,
        "clips_per_s": train_clips / train_time if train_time > 0 else None,
        "complete": complete,
        "history": history,
    }
