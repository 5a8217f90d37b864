"""What a run shows and leaves behind, written by rank 0 only.

  screen (stdout)            progress lines and an end-of-epoch summary
  run.dir/train.log          the same lines, so they survive the terminal
  run.dir/metrics.json       final metrics and per-epoch history, rewritten
                             after every epoch ("complete": false until the end)
  (run.dir/tensorboard/ is Keras's TensorBoard callback's, see `callbacks`)

Every rank builds a Reporter; on the others every method does nothing, so the
callbacks call them unconditionally. Numbers passed in are already global
(exact over ranks). A file that cannot be written (a full disk, a read-only
mount) raises ReportError, whose message is one line naming the file and
the reason, instead of a TensorFlow traceback (`writing`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import tensorflow as tf

METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
PREFIX = "[dist_bn]"


class ReportError(Exception):
    """An output file of the run could not be written; one line says which and why."""


def error_reason(err: BaseException, limit: int = 200) -> str:
    """Why a write failed, in one short line: an OSError's strerror, or the
    last clause of a TensorFlow error's first line ('...; No space left on device')."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(getattr(err, "message", None) or err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first)
    first = re.sub(r"\s*\[Op:\w+\]( name: \S*)?\s*$", "", first)
    reason = first.rsplit("; ", 1)[-1].strip() or first
    return reason if len(reason) <= limit else reason[:limit] + " ..."


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn a failed write of `path` (OSError, or TensorFlow's OpError from a
    summary writer) into a one-line ReportError."""
    try:
        yield
    except (OSError, tf.errors.OpError) as err:
        raise ReportError(f"cannot write {path}: {error_reason(err)}") from None


def progress_line(epoch: int, epochs: int, step: int, steps: int, loss: float, accuracy: float,
                  lr: float, clips_per_s: float) -> str:
    """One progress line: where we are, the epoch's metrics so far, speed since the last line."""
    width = len(str(steps))
    return (f"epoch {epoch}/{epochs}  step {step:>{width}}/{steps}  loss {loss:.4f}  acc {accuracy:.3f}"
            f"  lr {lr:.5f}  {clips_per_s:.1f} clips/s")


def epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    """The end-of-epoch summary from a history record."""
    return (f"epoch {record['epoch']}/{epochs} done in {record['epoch_time_s']:.1f}s: "
            f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f} | "
            f"eval loss {record['eval_loss']:.4f} acc {record['eval_accuracy']:.3f} "
            f"({record['eval_clips']} clips) | {record['clips_per_s']:.1f} clips/s")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # the previous file stays whole
        raise


def read_history(run_dir: str | os.PathLike, up_to_epoch: int) -> list[dict]:
    """The per-epoch records of an earlier session of this run, epochs <= up_to_epoch."""
    path = Path(run_dir) / METRICS_FILE
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in history if isinstance(r, dict) and r.get("epoch", up_to_epoch + 1) <= up_to_epoch]


class Reporter:
    """Screen, log file and metrics.json output of rank 0."""

    def __init__(self, run_dir: str | os.PathLike, active: bool):
        self.run_dir = Path(run_dir)
        self.active = active
        self._log = None
        if not active:
            return
        with writing(self.run_dir / LOG_FILE):
            self._log = open(self.run_dir / LOG_FILE, "a", encoding="utf-8")

    def say(self, text: str) -> None:
        """Print a line to the screen and append it, time-stamped, to train.log."""
        if not self.active:
            return
        print(f"{PREFIX} {text}", flush=True)
        with writing(self.run_dir / LOG_FILE):
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self._log.flush()

    def warn(self, text: str) -> None:
        if self.active:
            print(f"{PREFIX} warning: {text}", file=sys.stderr, flush=True)
            with writing(self.run_dir / LOG_FILE):
                self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {text}\n")
                self._log.flush()

    def metrics(self, data: Mapping[str, Any]) -> None:
        if self.active:
            with writing(self.run_dir / METRICS_FILE):
                write_json(self.run_dir / METRICS_FILE, data)

    def close(self) -> None:
        """Close train.log; a failure to flush it is not raised again (the
        error that stopped the run, if any, is the one to report)."""
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
