"""Turn a validated config into the exact launcher command and environment.

Two backends start the same worker on every rank:
  horovodrun  Horovod's launcher; knobs become its flags (--gloo or --mpi).
  mpirun      Open MPI directly; knobs become HOROVOD_* variables forwarded
              with -x, plus the flags Horovod documents for running under it.
The mapping from config keys to flags and variables follows Horovod 0.28.1
(horovod/runner/launch.py and mpi_run.py). Building is pure: nothing is run.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from launch.config import Config, ConfigError, format_override

WORKER_MODULE = "dist_bn.training"
VERIFY_MODULE = "dist_bn.verify"

# Variables every rank needs from the launching shell; mpirun forwards only
# what it is told to (horovodrun forwards the whole environment itself).
MPIRUN_FORWARDED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")

# From Horovod's mpi_run.py for Open MPI: no process binding (TensorFlow runs
# its own thread pools), and the ob1/TCP transports without openib.
MPIRUN_FLAGS = ("-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib")


@dataclass(frozen=True)
class Knob:
    """A config key that becomes a horovodrun flag, or an environment variable
    under mpirun. A switch (`switch_when` set) is a bare flag emitted when the
    value equals `switch_when`, and its variable is then 1."""

    key: str
    flag: str
    env: str
    to_env: Callable[[Any], str] = str
    switch_when: bool | None = None

    def value(self, config: Config) -> Any:
        section, name = self.key.split(".")
        return config[section][name]

    def active(self, config: Config) -> bool:
        value = self.value(config)
        return value is not None if self.switch_when is None else value is self.switch_when


KNOBS: tuple[Knob, ...] = (
    Knob("launcher.start_timeout", "--start-timeout", "HOROVOD_START_TIMEOUT"),
    Knob("horovod.fusion_threshold_mb", "--fusion-threshold-mb", "HOROVOD_FUSION_THRESHOLD",
         to_env=lambda mb: str(mb * 1024 * 1024)),
    Knob("horovod.cycle_time_ms", "--cycle-time-ms", "HOROVOD_CYCLE_TIME"),
    Knob("horovod.cache_capacity", "--cache-capacity", "HOROVOD_CACHE_CAPACITY"),
    Knob("horovod.timeline_filename", "--timeline-filename", "HOROVOD_TIMELINE"),
    Knob("horovod.autotune", "--autotune", "HOROVOD_AUTOTUNE", switch_when=True),
    Knob("horovod.autotune_log_file", "--autotune-log-file", "HOROVOD_AUTOTUNE_LOG"),
    Knob("horovod.stall_check", "--no-stall-check", "HOROVOD_STALL_CHECK_DISABLE", switch_when=False),
    Knob("horovod.stall_check_warning_time_seconds", "--stall-check-warning-time-seconds",
         "HOROVOD_STALL_CHECK_TIME_SECONDS"),
    Knob("horovod.stall_check_shutdown_time_seconds", "--stall-check-shutdown-time-seconds",
         "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"),
)


@dataclass(frozen=True)
class Launch:
    """What to run: `argv`, and the variables `env` set on top of the current
    environment. `forwarded` names the variables passed to ranks with -x."""

    argv: list[str]
    env: dict[str, str]
    forwarded: list[str] = field(default_factory=list)

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The launcher child's full environment."""
        return {**(os.environ if base is None else base), **self.env}


def horovod_environment(config: Config) -> dict[str, str]:
    """The HOROVOD_* variables of the knobs that are set: what ranks started
    without horovodrun (mpirun, srun) need in their environment."""
    return {knob.env: ("1" if knob.switch_when is not None else knob.to_env(knob.value(config)))
            for knob in KNOBS if knob.active(config)}


def rank_environment(config: Config) -> dict[str, str]:
    """Everything a rank started by a plain process launcher (srun) needs on top
    of the launching shell's environment: the Horovod knobs, launcher.env, and
    launcher.network_interfaces as NCCL_SOCKET_IFNAME and Open MPI's TCP
    interface list."""
    env = horovod_environment(config)
    env.update(_user_env(config))
    nics = config["launcher"]["network_interfaces"]
    if nics:
        env["NCCL_SOCKET_IFNAME"] = ",".join(nics)
        env["OMPI_MCA_btl_tcp_if_include"] = ",".join(nics)
    return env


def verify_argv(config: Config, verify_args: Sequence[str] = ()) -> list[str]:
    """The command every rank runs for `dist-bn-launch verify`: dist-bn-verify."""
    python = config["launcher"]["python"] or sys.executable
    return [python, "-m", VERIFY_MODULE, *verify_args]


def worker_argv(config: Config, config_path: str, overrides: Sequence[str]) -> list[str]:
    """The command every rank runs: the training job with the same config file
    (absolute) and overrides, plus run.dir made absolute, last so it wins."""
    python = config["launcher"]["python"] or sys.executable
    return [python, "-m", WORKER_MODULE, os.path.abspath(config_path), *overrides,
            format_override("run.dir", config["run"]["dir"])]


def _hosts(launcher: Mapping[str, Any]) -> str:
    return launcher["hosts"] or f"localhost:{launcher['num_proc']}"


def _user_env(config: Config) -> dict[str, str]:
    """launcher.env, refusing names the launcher itself sets from other keys."""
    env = dict(config["launcher"]["env"])
    owners = {knob.env: knob.key for knob in KNOBS if knob.active(config)}
    if config["launcher"]["network_interfaces"]:
        owners["NCCL_SOCKET_IFNAME"] = "launcher.network_interfaces"
    for name in env:
        if name in owners:
            raise ConfigError(f"launcher.env: {name} is also set by {owners[name]}; keep one of the two")
    return env


def _horovodrun(config: Config, program: str, worker: list[str]) -> Launch:
    launcher = config["launcher"]
    argv = [program, "-np", str(launcher["num_proc"])]
    if launcher["hostfile"] is not None:
        argv += ["--hostfile", launcher["hostfile"]]
    else:
        argv += ["-H", _hosts(launcher)]
    argv.append("--gloo" if launcher["controller"] == "gloo" else "--mpi")
    if launcher["network_interfaces"]:
        argv += ["--network-interfaces", ",".join(launcher["network_interfaces"])]
    if launcher["ssh_port"] is not None:
        argv += ["-p", str(launcher["ssh_port"])]
    if launcher["ssh_identity_file"] is not None:
        argv += ["-i", launcher["ssh_identity_file"]]
    for knob in KNOBS:
        if knob.active(config):
            argv += [knob.flag] if knob.switch_when is not None else [knob.flag, str(knob.value(config))]
    if launcher["verbose"]:
        argv.append("--verbose")
    argv += launcher["extra_args"]
    return Launch(argv + worker, _user_env(config))


def _mpirun(config: Config, program: str, worker: list[str], environ: Mapping[str, str]) -> Launch:
    launcher = config["launcher"]
    argv = [program]
    if os.geteuid() == 0:  # Open MPI refuses to run as root without it
        argv.append("--allow-run-as-root")
    argv += ["-np", str(launcher["num_proc"])]
    if launcher["hostfile"] is not None:
        argv += ["-hostfile", launcher["hostfile"]]
    else:
        argv += ["-H", _hosts(launcher)]  # explicit slots: more ranks than cores need no --oversubscribe
    argv += MPIRUN_FLAGS
    nics = launcher["network_interfaces"]
    if nics:
        argv += ["-mca", "btl_tcp_if_include", ",".join(nics), "-x", f"NCCL_SOCKET_IFNAME={','.join(nics)}"]
    ssh = []
    if launcher["ssh_port"] is not None:
        ssh += ["-p", str(launcher["ssh_port"])]
    if launcher["ssh_identity_file"] is not None:
        ssh += ["-i", launcher["ssh_identity_file"]]
    if ssh:
        argv += ["-mca", "plm_rsh_args", " ".join(ssh)]

    env = horovod_environment(config)
    env.update(_user_env(config))
    forwarded = [name for name in MPIRUN_FORWARDED if name in environ and name not in env]
    forwarded += list(env)
    for name in forwarded:
        argv += ["-x", name]
    argv += launcher["extra_args"]
    return Launch(argv + worker, env, forwarded)


def build_launch(config: Config, config_path: str, overrides: Sequence[str], program: str | None = None,
                 environ: Mapping[str, str] | None = None, worker: Sequence[str] | None = None) -> Launch:
    """The Launch for `config` (already through `preflight`, so local paths are
    absolute). `program` is the launcher executable (default: the backend's
    name); `environ` is the launching environment (default: os.environ);
    `worker` is what every rank runs (default: the training job)."""
    backend = config["launcher"]["backend"]
    worker = list(worker) if worker is not None else worker_argv(config, config_path, overrides)
    if backend == "horovodrun":
        return _horovodrun(config, program or backend, worker)
    return _mpirun(config, program or backend, worker, os.environ if environ is None else environ)
