"""The one schema of a dist_bn config: every key, its type, default, range and doc.

The launcher and the training job read the same YAML file, so both halves live
here (sections model, data, train, run for the job; launcher, horovod for the
launcher; cluster, slurm, k8s for the scheduler files `--emit` writes) and an
unknown or mistyped key anywhere is caught before any process starts. Keys are plain data (`Field` rows in `FIELDS`, cross-key `Rule` rows in
`RULES`); `launch.config` applies them and `render_markdown` documents them.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# ---------------------------------------------------------------------------
# Value types. Each knows how to check (and normalize) one YAML value, and how
# to describe itself for the docs table and for error messages.
# ---------------------------------------------------------------------------


class ValueProblem(Exception):
    """What is wrong with a value, phrased to follow its key: 'must be ..., got ...'."""


def show(value: Any) -> str:
    """Render a YAML value the way the user wrote it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# Characters that end a line, or change what a terminal, a shell or a YAML
# parser sees, inside what looks like one line: C0 and C1 controls (newline,
# carriage return, escape, NEL ...), DEL, and Unicode's line and paragraph
# separators. No config string needs them, and every string can reach a
# generated script or manifest, so they are refused outright.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` with every control character written as its Python escape
    (\\n, \\x1b, \\u2028): safe to put in one comment or message line."""
    return CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], text)


def control_character_problem(value: Any) -> str | None:
    """What is wrong if `value` (a string, or a list/mapping of them) holds a
    control character, else None."""
    texts = ([value] if isinstance(value, str) else list(value) if isinstance(value, list)
             else [*value, *value.values()] if isinstance(value, dict) else [])
    for text in texts:
        if isinstance(text, str):
            found = CONTROL_CHARACTERS.search(text)
            if found:
                return (f"must be printable text on one line, got {printable(repr(text))} with "
                        f"{printable(repr(found.group()))} at position {found.start()}")
    return None


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate most like `word` (difflib), for 'did you mean ...?' hints."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


class ValueType:
    """Base of the value types; `name` and `allowed` feed the docs table."""

    name = "?"

    def allowed(self) -> str:
        return "any"

    def check(self, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(ValueType):
    """An integer, optionally bounded (inclusive)."""

    min: int | None = None
    max: int | None = None
    name = "int"

    def allowed(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min} .. {self.max}"
        if self.min is not None:
            return f">= {self.min}"
        if self.max is not None:
            return f"<= {self.max}"
        return "any"

    def _wanted(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer from {self.min} to {self.max}"
        if self.min is not None:
            return f"an integer >= {self.min}"
        if self.max is not None:
            return f"an integer <= {self.max}"
        return "an integer"

    def check(self, value: Any) -> int:
        if not _is_int(value):
            raise ValueProblem(f"must be {self._wanted()}, got {show(value)}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueProblem(f"must be {self._wanted()}, got {value}")
        return value


# PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string. Accept that
# spelling for floats instead of failing on a number the user clearly meant.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class Float(ValueType):
    """A real number with optional open or closed bounds; integers are accepted."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    name = "float"

    def allowed(self) -> str:
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return f"{'(' if self.min_open else '['}{lo:g}, {hi:g}{')' if self.max_open else ']'}"
        if lo is not None:
            return f"{'>' if self.min_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.max_open else '<='} {hi:g}"
        return "any"

    def check(self, value: Any) -> float:
        bound = self.allowed()
        if bound == "any":
            wanted = "a number"
        elif bound[0] in "([":
            wanted = f"a number in {bound}"
        else:
            wanted = f"a number {bound}"
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueProblem(f"must be {wanted}, got {show(value)}")
        value = float(value)
        lo, hi = self.min, self.max
        if lo is not None and (value < lo or (self.min_open and value == lo)):
            raise ValueProblem(f"must be {wanted}, got {value:g}")
        if hi is not None and (value > hi or (self.max_open and value == hi)):
            raise ValueProblem(f"must be {wanted}, got {value:g}")
        return value


@dataclass(frozen=True)
class Bool(ValueType):
    """true or false (YAML booleans only, so a typo is not read as a string)."""

    name = "bool"

    def allowed(self) -> str:
        return "true, false"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueProblem(f"must be true or false, got {show(value)}")
        return value


@dataclass(frozen=True)
class Choice(ValueType):
    """One string out of a fixed set."""

    choices: tuple[str, ...]
    name = "str"

    def allowed(self) -> str:
        return ", ".join(self.choices)

    def check(self, value: Any) -> str:
        if value in self.choices and isinstance(value, str):
            return value
        listed = ", ".join(self.choices)
        hint = closest(value, list(self.choices)) if isinstance(value, str) else None
        suffix = f" (did you mean {hint}?)" if hint else ""
        raise ValueProblem(f"must be one of {listed}; got {show(value)}{suffix}")


@dataclass(frozen=True)
class Text(ValueType):
    """A non-empty string; `name` says what it holds (str, path, command)."""

    name: str = "str"

    def allowed(self) -> str:
        return "non-empty"

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueProblem(f"must be a non-empty string, got {show(value)}")
        return value


@dataclass(frozen=True)
class TextList(ValueType):
    """A list of non-empty strings (numbers are taken as text).

    With `comma_string`, a single "a,b" string is accepted and split, which is
    how the same value is written on the command line of horovodrun.
    """

    comma_string: bool = False
    name = "list of str"

    def allowed(self) -> str:
        return "list, or \"a,b\" string" if self.comma_string else "list"

    def check(self, value: Any) -> list[str]:
        wanted = "a list of strings" + (" or a comma-separated string" if self.comma_string else "")
        if self.comma_string and isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            raise ValueProblem(f"must be {wanted}, got {show(value)}")
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueProblem(f"must be {wanted}; item {show(item)} is not a string")
            text = str(item).strip() if self.comma_string else str(item)
            if not text:
                raise ValueProblem(f"must be {wanted}; it has an empty item")
            items.append(text)
        return items


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class EnvMap(ValueType):
    """Environment variables, NAME: value; values become strings."""

    name = "mapping"

    def allowed(self) -> str:
        return "NAME: value"

    def check(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise ValueProblem(f"must be a mapping of NAME: value, got {show(value)}")
        env = {}
        for name, item in value.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ValueProblem(f"{show(name)} is not a valid environment variable name")
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueProblem(
                    f"value of {name} must be a string or a number, got {show(item)}"
                    + (" (quote it: 'true')" if isinstance(item, bool) else "")
                )
            env[name] = str(item)
        return env


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


# ---------------------------------------------------------------------------
# The schema proper.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One config key. A null default means "unset": the key may also be null."""

    key: str
    type: ValueType
    default: Any
    doc: str

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    def check(self, value: Any) -> Any:
        """Normalize `value` or raise ValueProblem. Empty YAML (null) means an empty
        list/mapping for container keys and "unset" for keys whose default is null."""
        if value is None:
            if self.default is None:
                return None
            if isinstance(self.default, (list, dict)):
                return type(self.default)()
        value = self.type.check(value)
        problem = control_character_problem(value)
        if problem:
            raise ValueProblem(problem)
        return value


SECTIONS: dict[str, str] = {
    "model": "the network the training job builds",
    "data": "the synthetic video-clip data set",
    "train": "optimization and logging",
    "run": "where results go and what to do with an existing run",
    "launcher": "how processes are started (horovodrun or mpirun)",
    "horovod": "Horovod tuning knobs; null = Horovod's own default",
    "cluster": "the job's shape on a scheduler, for --emit slurm and --emit k8s-mpijob",
    "slurm": "the Slurm batch script (--emit slurm)",
    "k8s": "the Kubeflow MPIJob manifest (--emit k8s-mpijob)",
}

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

BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}


def section_keys(section: str) -> list[str]:
    """Key names (without the section) allowed in `section`, in schema order."""
    return [f.name for f in FIELDS if f.section == section]


# ---------------------------------------------------------------------------
# Rules that involve more than one key. `check` gets the filled-in config and
# returns a problem (reported under keys[0]) or None.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]
    doc: str
    check: Callable[[Mapping[str, Mapping[str, Any]]], str | None] = field(repr=False)


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


def _resume_or_overwrite(c):
    if c["run"]["resume"] and c["run"]["overwrite"]:
        return "run.resume and run.overwrite are both true; pick one"
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


RULES: tuple[Rule, ...] = (
    Rule(("launcher.controller", "launcher.backend"),
         "`launcher.controller: gloo` needs `launcher.backend: horovodrun` (mpirun implies MPI).",
         _gloo_needs_horovodrun),
    Rule(("launcher.hostfile", "launcher.hosts"), "`launcher.hosts` and `launcher.hostfile` exclude each other.",
         _hosts_or_hostfile),
    Rule(("launcher.hosts", "launcher.num_proc"),
         "Slots in `launcher.hosts` must add up to at least `launcher.num_proc`.", _enough_slots),
    Rule(("run.overwrite", "run.resume"), "`run.resume` and `run.overwrite` exclude each other.",
         _resume_or_overwrite),
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


# ---------------------------------------------------------------------------
# Documentation.
# ---------------------------------------------------------------------------


def _yaml_literal(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return "[]" if isinstance(value, list) else "{}"
    return show(value).strip("'")


def render_markdown() -> str:
    """The schema as a Markdown table (key, type, default, allowed, description),
    followed by the rules between keys; the README's table is this output."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for f in FIELDS:
        lines.append(
            f"| `{f.key}` | {cell(f.type.name)} | `{cell(_yaml_literal(f.default))}` "
            f"| {cell(f.type.allowed())} | {cell(f.doc)} |"
        )
    lines.append("")
    lines.append("Rules between keys:")
    lines.append("")
    lines.extend(f"- {rule.doc}" for rule in RULES)
    lines.append("- Checked by the launcher only, on the launching machine: `launcher.hostfile` and "
                 "`launcher.ssh_identity_file` exist; an existing non-empty `run.dir` needs "
                 "`run.resume` or `run.overwrite`; the launcher program is on `PATH`.")
    lines.append("- Checked by `--emit` only: the cluster shape (`cluster.nodes` x `cluster.ranks_per_node`, "
                 "or what `launcher.hosts` implies) equals `launcher.num_proc`; `--emit k8s-mpijob` needs "
                 "`cluster.image`.")
    return "\n".join(lines) + "\n"
