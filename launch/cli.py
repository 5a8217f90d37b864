"""The `dist-bn-launch` command: validate a config, then start the training job
on every rank with horovodrun or mpirun (or, with --dry-run, only print how).

    dist-bn-launch CONFIG.yaml [key.path=value ...] [--dry-run]
    dist-bn-launch --schema

Every config problem is reported before any process starts, as one line
'dist-bn-launch: error: WHERE: KEY: PROBLEM', with exit code 2. Otherwise the
exit code is the job's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from launch.command import Launch, build_launch
from launch.config import ConfigError, load_config
from launch.preflight import find_launcher, preflight
from launch.runner import run
from launch.schema import render_markdown

PROG = "dist-bn-launch"
USAGE_ERROR = 2

EPILOG = """\
examples:
  dist-bn-launch configs/demo.yaml --dry-run
  dist-bn-launch configs/demo.yaml train.batch_size=8 run.dir=runs/bs8
  dist-bn-launch configs/multi-node.yaml launcher.hosts=node1:8,node2:8
  dist-bn-launch --schema            # every key, its default and range

Overrides are read as YAML, so true, 3, 0.5, null and [a, b] keep their types.
Every rank runs: PYTHON -m dist_bn.training CONFIG.yaml OVERRIDES run.dir=ABSDIR
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start a dist_bn training job on every rank with horovodrun or mpirun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="set a config key, e.g. train.batch_size=8 (last one wins)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the command and environment, start nothing")
    parser.add_argument("--schema", action="store_true",
                        help="print every config key as a Markdown table and exit")
    return parser


def prepare(config_path: str, overrides: Sequence[str]) -> tuple[Launch, str]:
    """Load and check everything; return the Launch and its backend name.

    Errors from `load_config` already say where (file or command line); the
    later checks name only the key, so they are prefixed with the config path.
    """
    config = load_config(config_path, overrides)
    try:
        config = preflight(config)
        backend = config["launcher"]["backend"]
        program = find_launcher(backend)
        return build_launch(config, config_path, overrides, program), backend
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None


def describe(launch: Launch, backend: str) -> str:
    """The --dry-run report: comment lines plus copy-pasteable shell text."""
    lines = [f"# {PROG}: dry run, nothing was started."]
    if launch.env:
        lines.append("# Environment: this shell's, plus (every rank inherits it):")
    else:
        lines.append("# Environment: this shell's, unchanged (every rank inherits it).")
    lines.extend(f"export {name}={shlex.quote(value)}" for name, value in launch.env.items())
    if backend == "mpirun":
        lines.append("# mpirun forwards to every rank (-x): " + (" ".join(launch.forwarded) or "nothing"))
    lines.append("# Command:")
    lines.append(shlex.join(launch.argv))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dist-bn-launch` and `python -m launch`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.schema:
        sys.stdout.write(render_markdown())
        return 0
    if args.config is None:
        parser.error("the following arguments are required: CONFIG.yaml")

    try:
        launch, backend = prepare(args.config, args.overrides)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return USAGE_ERROR

    if args.dry_run:
        print(describe(launch, backend))
        return 0

    print(f"{PROG}: running: {shlex.join(launch.argv)}", file=sys.stderr, flush=True)
    try:
        return run(launch.argv, launch.child_env())
    except OSError as err:
        print(f"{PROG}: error: cannot start {launch.argv[0]}: {err.strerror or err}", file=sys.stderr)
        return USAGE_ERROR
