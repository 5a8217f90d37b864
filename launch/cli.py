"""The `dist-bn-launch` command: validate a config, then start the training job
on every rank with horovodrun or mpirun (or, with --dry-run, only print how),
or write a Slurm script or Kubeflow MPIJob that starts it on a cluster.

    dist-bn-launch CONFIG.yaml [key.path=value ...] [--dry-run]
    dist-bn-launch CONFIG.yaml [key.path=value ...] --emit slurm|k8s-mpijob [--output FILE]
    dist-bn-launch verify CONFIG.yaml [key.path=value ...] [--dry-run | --emit ...] [-- VERIFY_ARGS]
    dist-bn-launch --schema

`verify` runs dist-bn-verify (dist_bn.verify) on every rank instead of the
training job, with the config's launcher settings. Every config problem is
reported before any process starts, as one line
'dist-bn-launch: error: WHERE: KEY: PROBLEM', with exit code 2. Otherwise the
exit code is the job's.

Where things live: `launch/schema.py` (the launcher, horovod and cluster
sections, added to the job's own schema from `dist_bn.training.schema`),
`launch/config.py` (loading the whole file), `launch/preflight.py` (checks
before anything starts), `launch/command.py` (the horovodrun/mpirun command
line and the ranks' environment), `launch/runner.py` (running it: signals,
exit codes), `launch/emit.py` (Slurm script and MPIJob).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from launch.command import Launch, build_launch, verify_argv
from launch.config import ConfigError, load_config
from launch.emit import EMIT_KINDS, Job, emit
from launch.preflight import find_launcher, preflight
from launch.runner import run
from launch.schema import printable, render_markdown

PROG = "dist-bn-launch"
USAGE_ERROR = 2

EPILOG = """\
examples:
  dist-bn-launch configs/demo.yaml --dry-run
  dist-bn-launch configs/demo.yaml train.batch_size=8 run.dir=runs/bs8
  dist-bn-launch configs/multi-node.yaml launcher.hosts=node1:8,node2:8
  dist-bn-launch --schema            # every key, its default and range

  dist-bn-launch configs/multi-node.yaml --emit slurm --output job.sbatch
  dist-bn-launch configs/multi-node.yaml cluster.image=REGISTRY/dist-bn:gpu --emit k8s-mpijob
  dist-bn-launch verify configs/multi-node.yaml -- --process-sets all node

Overrides are read as YAML, so true, 3, 0.5, null and [a, b] keep their types.
Every rank runs: PYTHON -m dist_bn.training CONFIG.yaml OVERRIDES run.dir=ABSDIR
(after `verify`: PYTHON -m dist_bn.verify VERIFY_ARGS)
"""

VERIFY_EPILOG = """\
examples:
  dist-bn-launch verify configs/demo.yaml
  dist-bn-launch verify configs/multi-node.yaml -- --process-sets all node --dtypes float32 float16
  dist-bn-launch verify configs/multi-node.yaml --emit slurm --output verify.sbatch

Arguments after -- go to dist-bn-verify on every rank (dist-bn-verify --help).
"""


def build_parser(verify: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} verify" if verify else PROG,
        description=("Run dist-bn-verify on every rank with a config's launcher settings: check that "
                     "SyncBatchNormalization matches one process on the global batch." if verify else
                     "Start a dist_bn training job on every rank with horovodrun or mpirun."),
        epilog=VERIFY_EPILOG if verify else EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="set a config key, e.g. train.batch_size=8 (last one wins)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the command and environment, start nothing")
    parser.add_argument("--emit", choices=EMIT_KINDS, metavar="{" + ",".join(EMIT_KINDS) + "}",
                        help="write a Slurm batch script or a Kubeflow MPIJob manifest for this config "
                             "instead of running it (keys: cluster.*, slurm.*, k8s.*)")
    parser.add_argument("--output", metavar="FILE",
                        help="with --emit: write to FILE (never overwritten) instead of stdout")
    if not verify:
        parser.add_argument("--schema", action="store_true",
                            help="print every config key as a Markdown table and exit")
    return parser


def prepare(config_path: str, overrides: Sequence[str],
            verify_args: Sequence[str] | None = None) -> tuple[Launch, str]:
    """Load and check everything; return the Launch and its backend name.
    With `verify_args` (a list, maybe empty) every rank runs dist-bn-verify
    with them instead of the training job, and run.dir is not checked.

    Errors from `load_config` already say where (file or command line); the
    later checks name only the key, so they are prefixed with the config path.
    """
    config = load_config(config_path, overrides)
    try:
        config = preflight(config, run_dir=verify_args is None)
        backend = config["launcher"]["backend"]
        program = find_launcher(backend)
        worker = None if verify_args is None else verify_argv(config, verify_args)
        return build_launch(config, config_path, overrides, program, worker=worker), backend
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None


def write_emitted(kind: str, config_path: str, overrides: Sequence[str], job: Job, output: str | None) -> None:
    """Render the `kind` file for the config and print it, or write it to a new file."""
    config = load_config(config_path, overrides)
    try:
        text = emit(kind, config, config_path, overrides, job)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None
    if output is None:
        sys.stdout.write(text)
        return
    try:
        with open(output, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"--output: {output} already exists; not overwritten (remove it or pick another name)") \
            from None
    except OSError as err:
        raise ConfigError(f"--output: cannot write {output}: {err.strerror or err}") from None
    if kind == "slurm":
        os.chmod(output, 0o755)
    print(f"{PROG}: wrote {output} ({kind})", file=sys.stderr)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    verify = bool(argv) and argv[0] == "verify"
    verify_args: list[str] | None = None
    if verify:
        argv = argv[1:]
        verify_args = []
        if "--" in argv:
            cut = argv.index("--")
            argv, verify_args = argv[:cut], argv[cut + 1:]
    parser = build_parser(verify)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        hint = (f" (options of dist-bn-verify go after --: {PROG} verify CONFIG.yaml -- {shlex.join(unknown)})"
                if verify else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if getattr(args, "schema", False):
        sys.stdout.write(render_markdown())
        return 0
    if args.config is None:
        parser.error("the following arguments are required: CONFIG.yaml")
    if args.output is not None and args.emit is None:
        parser.error("--output needs --emit")
    if args.emit is not None and args.dry_run:
        parser.error("--emit writes a file for a cluster and --dry-run shows a local run; pick one")

    if args.emit is not None:
        command = shlex.join([PROG, *(["verify"] if verify else []), *argv]
                             + (["--", *verify_args] if verify_args else []))
        job = Job(verify=verify, verify_args=tuple(verify_args or ()), command=command)
        try:
            write_emitted(args.emit, args.config, args.overrides, job, args.output)
        except ConfigError as err:
            print(f"{PROG}: error: {printable(str(err))}", file=sys.stderr)
            return USAGE_ERROR
        return 0

    try:
        launch, backend = prepare(args.config, args.overrides, verify_args)
    except ConfigError as err:
        print(f"{PROG}: error: {printable(str(err))}", file=sys.stderr)
        return USAGE_ERROR

    if args.dry_run:
        print(describe(launch, backend))
        return 0

    print(f"{PROG}: running: {shlex.join(launch.argv)}", file=sys.stderr, flush=True)
    try:
        return run(launch.argv, launch.child_env(), rank_exit_codes=backend == "horovodrun")
    except OSError as err:
        print(f"{PROG}: error: cannot start {launch.argv[0]}: {err.strerror or err}", file=sys.stderr)
        return USAGE_ERROR
