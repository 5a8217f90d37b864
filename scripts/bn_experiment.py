#!/usr/bin/env python
"""Does synchronized batch norm behave like one big batch? A small experiment.

Trains the same model on the same data four times, with the same global
batch of 8 clips per step and the same learning rate:

  sync    4 ranks x 2 clips, model.bn: sync   (statistics over all 8 clips)
  local   4 ranks x 2 clips, model.bn: local  (statistics over each rank's 2)
  single  1 process x 8 clips, model.bn: sync (= plain Keras BN on 8 clips)
  precise as sync, plus precise BN (train.precise_bn_batches = PRECISE_BN_BATCHES)
          before every evaluation: the moving statistics replaced by the
          exact population statistics of that many global batches

The training job's data sharding gives every step the same 8 clips whatever
the number of ranks, so `sync` computes what `single` computes (up to float
rounding) and should track it epoch by epoch. `local` normalizes with
statistics of 2 clips: noisy, and not what inference uses (the moving
averages), so it should not. `precise` shows how much of the epoch-to-epoch
swing of held-out accuracy comes from noisy moving averages: the summary
gives every run's held-out accuracy per epoch and its minimum from epoch 3 on.

Each run goes through the launcher (`python -m launch configs/demo.yaml
OVERRIDES`) with small settings (EXPERIMENT below); the per-epoch history
each run writes to its metrics.json is collected into docs/bn_experiment.json
and plotted into docs/bn_experiment.png (eval accuracy, eval loss and train
loss per epoch). Plotting needs matplotlib (`pip install matplotlib`);
without it only the JSON is written. About 5-6 minutes on 2 CPU cores.

    .venv/bin/python scripts/bn_experiment.py            # run all, plot
    .venv/bin/python scripts/bn_experiment.py --epochs 3 # shorter
    .venv/bin/python scripts/bn_experiment.py --plot-only  # re-plot the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo.yaml"
RUN_TIMEOUT_S = 900

# Peak learning rate for the global batch of 8; each run's per-rank
# train.learning_rate is PEAK_LR / ranks, since the job multiplies by the ranks.
PEAK_LR = 0.02
EXPERIMENT = {  # overrides on top of configs/demo.yaml, the same for every run
    "data.frames": 8,
    "data.height": 16,
    "data.width": 16,
    "data.train_clips": 512,
    "data.eval_clips": 256,
    "model.width": 8,
    "model.depth": 3,
    "model.momentum": 0.9,
    "train.epochs": 6,
    "train.warmup_epochs": 1.0,
    "train.optimizer": "sgd",
    "train.log_every": 32,
    "run.tensorboard": False,
}


# Precise BN's global batches: half an epoch of the 512 training clips.
PRECISE_BN_BATCHES = 32
# The summary's "minimum from epoch MIN_FROM_EPOCH on" skips the warmup epochs.
MIN_FROM_EPOCH = 3

PER_RUN_KEYS = ("model.bn", "launcher.num_proc", "train.batch_size", "train.learning_rate", "train.epochs",
                "run.dir")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    ranks: int
    batch_size: int
    bn: str
    style: str  # matplotlib line style
    precise_bn_batches: int = 0


VARIANTS = (
    Variant("sync", "sync BN, 4 ranks x 2 clips", 4, 2, "sync", "-"),
    Variant("local", "local BN, 4 ranks x 2 clips", 4, 2, "local", "--"),
    Variant("single", "1 process x 8 clips (plain BN)", 1, 8, "sync", ":"),
    Variant("precise", f"sync BN + precise BN ({PRECISE_BN_BATCHES} batches), 4 ranks x 2", 4, 2, "sync", "-.",
            PRECISE_BN_BATCHES),
)


def overrides(variant: Variant, epochs: int, run_dir: Path, extra: dict | None = None) -> list[str]:
    settings = {**EXPERIMENT, **(extra or {}), "train.epochs": epochs, "model.bn": variant.bn,
                "launcher.num_proc": variant.ranks, "train.batch_size": variant.batch_size,
                "train.learning_rate": PEAK_LR / variant.ranks, "run.dir": str(run_dir),
                "train.precise_bn_batches": variant.precise_bn_batches}
    args = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    if variant.ranks == 1:  # a lone process may use both cores
        args += ['launcher.env.TF_NUM_INTRAOP_THREADS="2"']
    return args


def run_variant(variant: Variant, epochs: int, runs_dir: Path, extra: dict | None = None) -> dict:
    """Launch one training run; return its metrics.json plus the run's wall time."""
    run_dir = runs_dir / variant.name
    argv = [sys.executable, "-m", "launch", str(BASE_CONFIG), *overrides(variant, epochs, run_dir, extra)]
    log = runs_dir / f"{variant.name}.log"
    print(f"[bn_experiment] {variant.name}: {shlex.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            sys.exit(f"[bn_experiment] {variant.name} timed out after {RUN_TIMEOUT_S}s; log: {log}")
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"[bn_experiment] {variant.name} failed (exit {proc.returncode}); log: {log}\n"
                 + "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-20:]))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    print(f"[bn_experiment] {variant.name}: eval accuracy {metrics['eval_accuracy']:.3f} "
          f"after {metrics['epochs']} epochs, {wall:.0f}s", flush=True)
    return {"label": variant.label, "ranks": variant.ranks, "batch_size_per_rank": variant.batch_size,
            "bn": variant.bn, "precise_bn_batches": variant.precise_bn_batches, "launch_wall_time_s": round(wall, 1),
            "final": {k: metrics[k] for k in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy")},
            "history": [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy", "eval_loss",
                                           "eval_accuracy")} for r in metrics["history"]]}


def summarize(runs: dict) -> dict:
    """How far sync and local are from the single-process run, epoch by epoch;
    and every run's held-out accuracy per epoch, with its minimum from epoch
    MIN_FROM_EPOCH on."""
    single = runs["single"]["history"]
    summary = {}
    for name, run in runs.items():
        accuracy = [r["eval_accuracy"] for r in run["history"]]
        late = [r["eval_accuracy"] for r in run["history"] if r["epoch"] >= MIN_FROM_EPOCH]
        summary[f"{name}_eval_accuracy"] = {"per_epoch": accuracy,
                                            f"min_from_epoch_{MIN_FROM_EPOCH}": min(late) if late else None}
    for name in ("sync", "local"):
        history = runs[name]["history"]
        gaps = [abs(a["eval_accuracy"] - b["eval_accuracy"]) for a, b in zip(history, single)]
        loss_gaps = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(history, single)]
        summary[f"{name}_vs_single"] = {"max_abs_eval_accuracy_gap": max(gaps),
                                        "max_abs_train_loss_gap": max(loss_gaps)}
    return summary


def plot(results: dict, png: Path) -> bool:
    """Eval accuracy, eval loss and train loss per epoch, one line per variant."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bn_experiment] matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return False
    panels = (("eval_accuracy", "eval accuracy (held-out, inference mode)"),
              ("eval_loss", "eval loss"), ("train_loss", "train loss (epoch mean)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.3))
    styles = {v.name: v.style for v in VARIANTS}
    for ax, (key, title) in zip(axes, panels):
        for name, run in results["runs"].items():
            epochs = [r["epoch"] for r in run["history"]]
            ax.plot(epochs, [r[key] for r in run["history"]], styles.get(name, "-"), marker="o",
                    label=run["label"], linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    settings = results["settings"]
    axes[0].axhline(1.0 / settings["data.num_classes"], color="gray", linewidth=1, label="chance")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle(f"Global batch of 8 clips: synchronized vs local batch norm, and precise BN ({settings['data.train_clips']} "
                 f"training clips of {settings['data.frames']} frames x {settings['data.height']}x"
                 f"{settings['data.width']}, BN momentum {settings['model.momentum']})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EXPERIMENT["train.epochs"])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bn_experiment",
                        help="output prefix: writes PREFIX.json and PREFIX.png (default docs/bn_experiment)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the run directories and logs here (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a shared setting, e.g. --set model.momentum=0.99 (repeatable; "
                             "not the per-run keys bn, ranks, batch size, learning rate, run.dir)")
    parser.add_argument("--only", action="append", choices=[v.name for v in VARIANTS], default=None,
                        help="run only these variants (repeatable); the others' results are kept from "
                             "PREFIX.json")
    parser.add_argument("--plot-only", action="store_true", help="re-plot PREFIX.json, run nothing")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key in PER_RUN_KEYS:
            parser.error(f"--set {item!r}: expected KEY=VALUE with a key other than {', '.join(PER_RUN_KEYS)}")
        extra[key] = yaml.safe_load(value)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")

    if args.plot_only:
        results = json.loads(json_path.read_text(encoding="utf-8"))
    else:
        with tempfile.TemporaryDirectory(prefix="bn_experiment.") as tmp:
            runs_dir = args.runs_dir or Path(tmp)
            runs_dir.mkdir(parents=True, exist_ok=True)
            if any(runs_dir.iterdir()) and args.runs_dir is not None:
                parser.error(f"--runs-dir {runs_dir} is not empty; give a new or empty directory")
            start = time.perf_counter()
            previous = json.loads(json_path.read_text(encoding="utf-8"))["runs"] if args.only else {}
            runs = {v.name: run_variant(v, args.epochs, runs_dir, extra) if not args.only or v.name in args.only
                    else previous[v.name] for v in VARIANTS}
            settings = {**EXPERIMENT, **extra, "train.epochs": args.epochs}
            settings.pop("train.log_every", None)
            settings.update({"peak_learning_rate": PEAK_LR, "global_batch": 8, "data.num_classes": 4,
                             "base_config": str(BASE_CONFIG.relative_to(REPO)),
                             "precise_bn_batches": PRECISE_BN_BATCHES})
            results = {"settings": settings, "runs": runs, "summary": summarize(runs),
                       "total_wall_time_s": round(time.perf_counter() - start, 1)}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"[bn_experiment] numbers in {os.path.relpath(json_path)}")

    header = f"{'epoch':>5} " + " ".join(f"{name + ' acc':>12} {name + ' loss':>12}" for name in results["runs"])
    print(header)
    histories = [run["history"] for run in results["runs"].values()]
    for rows in zip(*histories):
        print(f"{rows[0]['epoch']:>5} " + " ".join(f"{r['eval_accuracy']:>12.3f} {r['train_loss']:>12.4f}"
                                                   for r in rows))
    print("(acc = eval accuracy, loss = train loss)")
    for name, gaps in results.get("summary", {}).items():
        if "per_epoch" in gaps:
            low = gaps[f"min_from_epoch_{MIN_FROM_EPOCH}"]
            print(f"{name}: per epoch {', '.join(f'{a:.3f}' for a in gaps['per_epoch'])}; "
                  f"min from epoch {MIN_FROM_EPOCH}: {'-' if low is None else f'{low:.3f}'}")
            continue
        print(f"{name}: max |eval acc gap| {gaps['max_abs_eval_accuracy_gap']:.3f}, "
              f"max |train loss gap| {gaps['max_abs_train_loss_gap']:.4f}")
    if plot(results, png_path):
        print(f"[bn_experiment] plot in {os.path.relpath(png_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
