"""The whole config file's schema: the training job's sections (model, data,
train, run; owned by `dist_bn.training.schema`) and the launcher's (launcher,
horovod; cluster, slurm, k8s for the scheduler files `--emit` writes).

The launcher checks the whole file with `SCHEMA` before any process starts,
so an unknown or mistyped key anywhere is caught first; `render_markdown` is
the README's reference. The value types and the loader are `dist_bn.config`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dist_bn.config import Field, Rule, Schema
from dist_bn.config import render_markdown as render_schema
from dist_bn.config.values import (CONTROL_CHARACTERS, Bool, Choice, EnvMap, Float, Int, Text, TextList,  # noqa: F401
                                   ValueProblem, ValueType, printable, show)
from dist_bn.training.schema import SCHEMA as JOB_SCHEMA

# A host name (RFC 1123 labels; '_' too, which some clusters use) or an IPv4
# address: letters, digits, '-', '_' and '.', starting and ending with a letter
# or digit. Host names reach ssh, horovodrun and mpirun command lines (and
# --emit's scripts), so nothing else passes: no ';', '$(...)', spaces, or a
# leading '-' that a program would read as an option.
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*")


def host_problem(name: str) -> str | None:
    """Why `name` is not a host name or IPv4 address, else None."""
    if HOST_NAME.fullmatch(name):
        return None
    return (f"host {printable(repr(name))} is not a host name or IPv4 address (letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit)")


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """Split "h1:4,h2:4" into [("h1", 4), ("h2", 4)]; raise ValueProblem if malformed."""
    pairs = []
    for entry in text.split(","):
        entry = entry.strip()
        name, sep, slots = entry.rpartition(":")
        if not sep or not name or re.search(r"\s", name) or not slots.isdigit() or int(slots) < 1:
            raise ValueProblem(f"entry {printable(repr(entry))} must be host:slots with slots >= 1, e.g. node1:8")
        if host_problem(name):
            raise ValueProblem(f"entry {printable(repr(entry))}: {host_problem(name)}")
        if any(name == seen for seen, _ in pairs):
            raise ValueProblem(f"lists host {name!r} twice")
        pairs.append((name, int(slots)))
    return pairs


@dataclass(frozen=True)
class Hosts(ValueType):
    """Hosts with slot counts, "h1:4,h2:4" or a list; normalized to the string form."""

    name = "hosts"

    def allowed(self) -> str:
        return "\"h1:4,h2:4\" or list"

    def check(self, value: Any) -> str:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            value = ",".join(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueProblem(f"must be host:slots entries such as \"node1:8,node2:8\", got {show(value)}")
        return ",".join(f"{name}:{slots}" for name, slots in parse_hosts(value))


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Label(ValueType):
    """A Kubernetes name (DNS-1123 label): lowercase letters, digits and '-',
    starting and ending with a letter or digit, at most `max_length` long."""

    max_length: int = 63
    name = "name"

    def allowed(self) -> str:
        return f"a-z, 0-9, '-'; <= {self.max_length} chars"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not _LABEL.fullmatch(value) or len(value) > self.max_length:
            raise ValueProblem(
                f"must be lowercase letters, digits and '-', starting and ending with a letter or digit, "
                f"at most {self.max_length} characters, got {show(value)}")
        return value


LAUNCHER_SECTIONS: dict[str, str] = {
    "launcher": "how processes are started (horovodrun or mpirun)",
    "horovod": "Horovod tuning knobs; null = Horovod's own default",
    "cluster": "the job's shape on a scheduler, for --emit slurm and --emit k8s-mpijob",
    "slurm": "the Slurm batch script (--emit slurm)",
    "k8s": "the Kubeflow MPIJob manifest (--emit k8s-mpijob)",
}

LAUNCHER_FIELDS: tuple[Field, ...] = (
    # launcher
    Field("launcher.backend", Choice(("horovodrun", "mpirun")), "horovodrun", "Program that starts the ranks."),
    Field("launcher.controller", Choice(("gloo", "mpi")), "mpi",
          "Horovod controller: horovodrun --mpi or --gloo; mpirun needs mpi. With mpi the "
          "BN layers' all-reduce goes straight through MPI (README, Performance)."),
    Field("launcher.num_proc", Int(1, 65536), 2, "Number of ranks (-np)."),
    Field("launcher.hosts", Hosts(), None, "Hosts and slots (-H); null = localhost:num_proc."),
    Field("launcher.hostfile", Text("path"), None,
          "Host file, one 'host slots=N' per line (horovodrun --hostfile, mpirun -hostfile)."),
    Field("launcher.network_interfaces", TextList(comma_string=True), None,
          "NICs to use (--network-interfaces; mpirun: btl_tcp_if_include and NCCL_SOCKET_IFNAME)."),
    Field("launcher.ssh_port", Int(1, 65535), None, "SSH port on all hosts (-p)."),
    Field("launcher.ssh_identity_file", Text("path"), None, "SSH private key on this machine (-i)."),
    Field("launcher.start_timeout", Int(min=1), None,
          "Seconds for horovodrun to check hosts and start ranks (--start-timeout; Horovod: 30)."),
    Field("launcher.python", Text("command"), None,
          "Python every rank runs; null = the launcher's own interpreter (same path on every host)."),
    Field("launcher.env", EnvMap(), {}, "Extra environment for every rank (mpirun: also -x NAME)."),
    Field("launcher.extra_args", TextList(), [], "Arguments appended to the launcher's own flags (escape hatch)."),
    Field("launcher.verbose", Bool(), False, "horovodrun --verbose (no effect with mpirun)."),
    # horovod
    Field("horovod.fusion_threshold_mb", Int(min=0), None,
          "Tensor fusion buffer in MB, 0 disables fusion (--fusion-threshold-mb; Horovod: 128)."),
    Field("horovod.cycle_time_ms", Float(0, min_open=True), None,
          "Fusion cycle time in ms (--cycle-time-ms; Horovod: 1)."),
    Field("horovod.cache_capacity", Int(min=0), None,
          "Response cache entries, 0 disables (--cache-capacity; Horovod: 1024)."),
    Field("horovod.timeline_filename", Text("path"), None, "Write a Horovod timeline JSON here (--timeline-filename)."),
    Field("horovod.autotune", Bool(), False, "Autotune the knobs above at run time (--autotune)."),
    Field("horovod.autotune_log_file", Text("path"), None, "CSV log of autotune trials (--autotune-log-file)."),
    Field("horovod.stall_check", Bool(), True, "Warn when ranks stall; false = --no-stall-check."),
    Field("horovod.stall_check_warning_time_seconds", Int(min=0), None,
          "Seconds before a stall warning (--stall-check-warning-time-seconds; Horovod: 60)."),
    Field("horovod.stall_check_shutdown_time_seconds", Int(min=0), None,
          "Seconds before a stalled job shuts down, 0 = never (--stall-check-shutdown-time-seconds)."),
    # cluster
    Field("cluster.nodes", Int(min=1), None,
          "Nodes (Slurm --nodes, MPIJob Worker replicas); null = the hosts in launcher.hosts, else 1."),
    Field("cluster.ranks_per_node", Int(min=1), None,
          "Ranks per node (Slurm --ntasks-per-node, MPIJob slotsPerWorker); null = launcher.num_proc / nodes."),
    Field("cluster.gpus_per_node", Int(min=0), 0,
          "GPUs per node (Slurm --gpus-per-node, MPIJob nvidia.com/gpu per worker); 0 = a CPU job."),
    Field("cluster.cpus_per_rank", Int(min=1), None,
          "CPU cores per rank (Slurm --cpus-per-task; MPIJob: times ranks_per_node per worker); null = default."),
    Field("cluster.memory_gb", Int(min=1), None,
          "Memory per node in GiB (Slurm --mem; MPIJob worker request and limit); null = the default."),
    Field("cluster.image", Text("image"), None,
          "Container image with dist_bn installed, e.g. built from docker/Dockerfile.gpu (k8s-mpijob needs it)."),
    Field("cluster.job_name", Label(max_length=40), "dist-bn",
          "Job name (Slurm --job-name, MPIJob name; its pods are NAME-launcher and NAME-worker-N)."),
    # slurm
    Field("slurm.partition", Text(), None, "Partition (--partition); null = the cluster's default."),
    Field("slurm.account", Text(), None, "Account charged for the job (--account)."),
    Field("slurm.time_minutes", Int(min=1), 60, "Wall-clock limit in minutes (--time)."),
    Field("slurm.output", Text("path"), None,
          "Job log (--output, e.g. logs/%x-%j.out, relative to where --emit ran); null = slurm-%j.out."),
    Field("slurm.directives", TextList(), [], "More #SBATCH options, e.g. [--qos=high, --exclusive]."),
    Field("slurm.setup", TextList(), [],
          "Shell lines run on the first node before the job, e.g. [module load cuda/12.5, source .venv/bin/activate]."),
    Field("slurm.launch", Choice(("launcher", "srun")), "launcher",
          "launcher: dist-bn-launch on the first node starts every rank over SSH (launcher.backend); "
          "srun: srun starts them (no SSH; Horovod's MPI controller)."),
    Field("slurm.srun_mpi", Text(), "pmix", "srun --mpi plugin when slurm.launch is srun (pmix, pmi2, ...)."),
    # k8s
    Field("k8s.namespace", Label(), "default", "Namespace of the MPIJob and of the ConfigMap holding the config."),
    Field("k8s.image_pull_policy", Choice(("IfNotPresent", "Always", "Never")), "IfNotPresent",
          "imagePullPolicy of every pod."),
    Field("k8s.ssh_port", Int(1, 65535), 2222,
          "Port of the workers' SSH servers (the image's SSH_PORT); launcher.ssh_port is set to it."),
    Field("k8s.runs_volume_claim", Label(), None,
          "PersistentVolumeClaim mounted on every pod at the parent of run.dir, so checkpoints outlive the job."),
    Field("k8s.workdir", Text("path"), "/workspace",
          "Working directory in the pods; a relative run.dir is under it."),
)


def _gloo_needs_horovodrun(c):
    if c["launcher"]["controller"] == "gloo" and c["launcher"]["backend"] == "mpirun":
        return ("gloo needs launcher.backend: horovodrun; mpirun always starts Horovod's MPI "
                "controller, so set launcher.controller: mpi (or launcher.backend: horovodrun)")
    return None


def _hosts_or_hostfile(c):
    if c["launcher"]["hosts"] is not None and c["launcher"]["hostfile"] is not None:
        return "set launcher.hosts or launcher.hostfile, not both"
    return None


def _enough_slots(c):
    hosts, num_proc = c["launcher"]["hosts"], c["launcher"]["num_proc"]
    if hosts is None:
        return None
    slots = sum(n for _, n in parse_hosts(hosts))
    if slots < num_proc:
        return (f"slots add up to {slots} but launcher.num_proc is {num_proc}; "
                "add hosts or slots, or lower launcher.num_proc")
    return None


def _autotune_log_needs_autotune(c):
    if c["horovod"]["autotune_log_file"] is not None and not c["horovod"]["autotune"]:
        return "is only written with horovod.autotune: true"
    return None


def _stall_times_need_stall_check(c):
    h = c["horovod"]
    if not h["stall_check"]:
        for name in ("stall_check_warning_time_seconds", "stall_check_shutdown_time_seconds"):
            if h[name] is not None:
                return f"horovod.{name} has no effect with the stall check off; drop one of the two"
    return None


def _cluster_shape_matches(c):
    nodes, per_node = c["cluster"]["nodes"], c["cluster"]["ranks_per_node"]
    num_proc = c["launcher"]["num_proc"]
    if nodes is not None and per_node is not None and nodes * per_node != num_proc:
        return (f"cluster.nodes x cluster.ranks_per_node = {nodes} x {per_node} = {nodes * per_node} "
                f"but launcher.num_proc is {num_proc}; make them agree")
    return None


def _absolute_workdir(c):
    if not c["k8s"]["workdir"].startswith("/"):
        return f"must be an absolute path, got {c['k8s']['workdir']!r}"
    return None


LAUNCHER_RULES: tuple[Rule, ...] = (
    Rule(("launcher.controller", "launcher.backend"),
         "`launcher.controller: gloo` needs `launcher.backend: horovodrun` (mpirun implies MPI).",
         _gloo_needs_horovodrun),
    Rule(("launcher.hostfile", "launcher.hosts"), "`launcher.hosts` and `launcher.hostfile` exclude each other.",
         _hosts_or_hostfile),
    Rule(("launcher.hosts", "launcher.num_proc"),
         "Slots in `launcher.hosts` must add up to at least `launcher.num_proc`.", _enough_slots),
    Rule(("horovod.autotune_log_file", "horovod.autotune"),
         "`horovod.autotune_log_file` needs `horovod.autotune: true`.", _autotune_log_needs_autotune),
    Rule(("horovod.stall_check", "horovod.stall_check_warning_time_seconds",
          "horovod.stall_check_shutdown_time_seconds"),
         "Stall check times need `horovod.stall_check: true`.", _stall_times_need_stall_check),
    Rule(("cluster.ranks_per_node", "cluster.nodes", "launcher.num_proc"),
         "`cluster.nodes` x `cluster.ranks_per_node` must equal `launcher.num_proc` when both are set.",
         _cluster_shape_matches),
    Rule(("k8s.workdir",), "`k8s.workdir` is an absolute path.", _absolute_workdir),
)

NOTES = (
    'Checked by the launcher only, on the launching machine: `launcher.hostfile` and `launcher.ssh_identity_file` exist; an existing non-empty `run.dir` needs `run.resume` or `run.overwrite`; the launcher program is on `PATH`.',
    'Checked by `--emit` only: the cluster shape (`cluster.nodes` x `cluster.ranks_per_node`, or what `launcher.hosts` implies) equals `launcher.num_proc`; `--emit k8s-mpijob` needs `cluster.image`.',
)

SCHEMA = JOB_SCHEMA + Schema(LAUNCHER_SECTIONS, LAUNCHER_FIELDS, LAUNCHER_RULES, notes=NOTES)
SECTIONS = dict(SCHEMA.sections)
FIELDS = SCHEMA.fields
RULES = SCHEMA.rules
BY_KEY = SCHEMA.by_key


def section_keys(section: str) -> list[str]:
    """Key names (without the section) allowed in `section`, in schema order."""
    return SCHEMA.section_keys(section)


def render_markdown() -> str:
    """The whole file's reference (keys, then rules between keys); the README's table is this output."""
    return render_schema(SCHEMA)
