"""Scheduler files for a config: a Slurm batch script and a Kubeflow MPIJob.

`dist-bn-launch CONFIG [overrides] --emit slurm` and `--emit k8s-mpijob` (and
the same after `dist-bn-launch verify`) write what starts the same job on a
cluster, from the same validated config:

  slurm        an sbatch script. Its #SBATCH lines come from the cluster and
               slurm sections; at run time it turns the allocation's node list
               (`scontrol show hostnames "$SLURM_JOB_NODELIST"`) into
               `launcher.hosts=node1:R,node2:R` for dist-bn-launch on the first
               node (slurm.launch: launcher), or starts every rank with srun
               (slurm.launch: srun, no SSH between nodes).
  k8s-mpijob   a ConfigMap holding the fully resolved config, and an MPIJob
               (kubeflow.org/v2beta1) whose launcher runs dist-bn-launch with
               the operator's host file and whose workers run the image's SSH
               server (docker/entrypoint.sh worker).

Rendering is pure: nothing is submitted or applied.
"""
from __future__ import annotations

import copy
import os
import posixpath
import shlex
import sys
from dataclasses import dataclass
from typing import Sequence

import yaml

from launch.command import rank_environment, verify_argv, worker_argv
from launch.config import Config, ConfigError
from launch.preflight import absolute
from launch.schema import CONTROL_CHARACTERS, parse_hosts, printable

EMIT_KINDS = ("slurm", "k8s-mpijob")
MPIJOB_API_VERSION = "kubeflow.org/v2beta1"
# Where the MPI Operator (v2) puts the host file on the launcher ("host slots=N" lines)
# and the SSH keys it generates for the job (id_rsa, id_rsa.pub, authorized_keys).
OPERATOR_HOSTFILE = "/etc/mpi/hostfile"
SSH_AUTH_MOUNT_PATH = "/root/.ssh"
CONFIG_MOUNT_PATH = "/etc/dist-bn"
CONFIG_FILE_NAME = "config.yaml"


@dataclass(frozen=True)
class Job:
    """What the emitted file runs: the training job, or dist-bn-verify with its arguments."""

    verify: bool = False
    verify_args: tuple[str, ...] = ()
    # The command line that produced the file, for its header.
    command: str = ""


def cluster_shape(config: Config) -> tuple[int, int]:
    """(nodes, ranks per node) of the job on a scheduler, from cluster.nodes and
    cluster.ranks_per_node, else what launcher.hosts says, else one node.
    Raises ConfigError unless nodes x ranks per node = launcher.num_proc."""
    cluster, launcher = config["cluster"], config["launcher"]
    num_proc = launcher["num_proc"]
    nodes, per_node = cluster["nodes"], cluster["ranks_per_node"]
    if nodes is None and per_node is None:
        if launcher["hosts"]:
            hosts = parse_hosts(launcher["hosts"])
            slots = sorted({n for _, n in hosts})
            if len(slots) > 1:
                raise ConfigError(
                    f"cluster.ranks_per_node: launcher.hosts has nodes with different slot counts "
                    f"({launcher['hosts']}); a scheduler job runs the same number of ranks on every "
                    "node, so set cluster.nodes and cluster.ranks_per_node")
            nodes, per_node = len(hosts), slots[0]
        else:
            nodes, per_node = 1, num_proc
    elif nodes is None:
        if num_proc % per_node:
            raise ConfigError(f"cluster.ranks_per_node: launcher.num_proc = {num_proc} ranks do not fill "
                              f"nodes of {per_node}; set cluster.nodes or change launcher.num_proc")
        nodes = num_proc // per_node
    elif per_node is None:
        if num_proc % nodes:
            raise ConfigError(f"cluster.nodes: launcher.num_proc = {num_proc} ranks do not split evenly over "
                              f"{nodes} nodes; set cluster.ranks_per_node or change launcher.num_proc")
        per_node = num_proc // nodes
    if nodes * per_node != num_proc:
        raise ConfigError(
            f"launcher.num_proc: the job would get {nodes} node(s) x {per_node} rank(s) = {nodes * per_node} "
            f"slots (from launcher.hosts) for {num_proc} ranks; set launcher.num_proc={nodes * per_node} or "
            "cluster.nodes and cluster.ranks_per_node")
    return nodes, per_node


def slurm_time(minutes: int) -> str:
    """Minutes as Slurm's [D-]HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return (f"{days}-" if days else "") + f"{hours:02d}:{mins:02d}:00"


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for people and kubectl: no &anchors/*aliases for repeated
    objects, and multi-line strings (the embedded config) as | blocks."""

    def ignore_aliases(self, data):
        return True


def _represent_str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def _dump(document) -> str:
    return yaml.dump(document, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False)


def _header(kind: str, job: Job) -> list[str]:
    """The file's first comment lines. The command that wrote the file is shown
    with its control characters escaped: a newline in it would otherwise end
    the comment and turn the rest into shell commands or YAML."""
    what = "dist-bn-verify" if job.verify else "dist_bn training job"
    return [f"# {what} as {kind}, written by: {printable(job.command)}" if job.command else f"# {what} as {kind}.",
            "# Write it again after changing the config; every key: dist-bn-launch --schema"]


@dataclass(frozen=True)
class Target:
    """What one emitted file starts: the validated config (and the absolute
    path and overrides it came from), the job, and the cluster's shape."""

    config: Config
    config_file: str
    overrides: tuple[str, ...]
    job: Job
    nodes: int
    per_node: int
    cwd: str

    @classmethod
    def of(cls, config: Config, config_path: str, overrides: Sequence[str], job: Job,
           cwd: str | None = None) -> "Target":
        cwd = cwd or os.getcwd()
        nodes, per_node = cluster_shape(config)
        return cls(config, absolute(config_path, cwd), tuple(overrides), job, nodes, per_node, cwd)


def sbatch_directives(target: Target) -> list[str]:
    """The #SBATCH options: the cluster and slurm sections, then slurm.directives; each checked."""
    cluster, slurm = target.config["cluster"], target.config["slurm"]
    directives = [
        f"--job-name={cluster['job_name']}",
        f"--nodes={target.nodes}",
        f"--ntasks-per-node={target.per_node}",
    ]
    optional = [
        ("--gpus-per-node={}", cluster["gpus_per_node"] or None),
        ("--cpus-per-task={}", cluster["cpus_per_rank"]),
        ("--mem={}G", cluster["memory_gb"]),
        ("--time={}", slurm_time(slurm["time_minutes"])),
        ("--partition={}", slurm["partition"]),
        ("--account={}", slurm["account"]),
        ("--output={}", slurm["output"]),
        ("--chdir={}", target.cwd),
    ]
    for form, value in optional:
        if value is not None and CONTROL_CHARACTERS.search(str(value)):
            # Only the working directory can get here (config strings are checked):
            # sbatch reads #SBATCH lines one by one, so a newline would end the line.
            raise ConfigError(f"--chdir: the directory {printable(repr(str(value)))} has a control character "
                              "in its name; run --emit from another directory")
    directives += [form.format(value) for form, value in optional if value is not None]
    directives.extend(slurm["directives"])
    for directive in directives:
        if CONTROL_CHARACTERS.search(directive) or not directive.startswith("-"):
            raise ConfigError(f"slurm.directives: {printable(repr(directive))} is not an sbatch option such as "
                              "--qos=high")
    return directives


def _srun_lines(target: Target) -> list[str]:
    """slurm.launch: srun starts every rank itself, with the rank environment exported."""
    config, job, slurm = target.config, target.job, target.config["slurm"]
    lines = []
    env = rank_environment(config)
    if env:
        lines.append("# Horovod knobs, launcher.env and launcher.network_interfaces for every rank"
                     " (srun passes the environment on).")
        lines.extend(f"export {name}={shlex.quote(value)}" for name, value in env.items())
        lines.append("")
    if job.verify:
        worker = verify_argv(config, job.verify_args)
    else:
        resolved = copy.deepcopy(config)
        resolved["run"]["dir"] = absolute(config["run"]["dir"], target.cwd)
        worker = worker_argv(resolved, target.config_file, list(target.overrides))
    ranks = target.nodes * target.per_node
    srun = ["srun", f"--mpi={slurm['srun_mpi']}", f"--nodes={target.nodes}", f"--ntasks={ranks}",
            f"--ntasks-per-node={target.per_node}", "--cpu-bind=none", "--kill-on-bad-exit=1"]
    lines.append("# srun starts every rank; Horovod runs its MPI controller (no SSH, no horovodrun).")
    lines.append("exec " + shlex.join(srun + worker))
    return lines


def _launcher_lines(target: Target) -> list[str]:
    """slurm.launch: launcher: dist-bn-launch on the first node, given the allocation's nodes as hosts."""
    launcher, job, per_node = target.config["launcher"], target.job, target.per_node
    lines = [
        "# The allocation's nodes as launcher hosts, e.g. node1:R,node2:R "
        f"(R = {per_node} ranks per node).",
        'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" |',
        f"    awk -v slots={per_node} 'NF {{printf \"%s%s:%d\", sep, $1, slots; sep = \",\"}}')",
        'if [[ -z $hosts ]]; then',
        '    echo "dist-bn: no nodes in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}" >&2',
        "    exit 2",
        "fi",
        'echo "dist-bn: hosts $hosts" >&2',
        "",
        f"# dist-bn-launch ({launcher['backend']}) on this, the first node, reaches the others over SSH.",
    ]
    python = launcher["python"] or sys.executable
    argv = [python, "-m", "launch"] + (["verify"] if job.verify else []) + [target.config_file, *target.overrides]
    if launcher["hostfile"] is not None:
        argv.append("launcher.hostfile=null")
    command = "exec " + shlex.join(argv) + ' "launcher.hosts=$hosts"'
    if job.verify and job.verify_args:
        command += " -- " + shlex.join(job.verify_args)
    lines.append(command)
    return lines


def slurm_script(config: Config, config_path: str, overrides: Sequence[str], job: Job,
                 cwd: str | None = None) -> str:
    """An sbatch script that runs `job` with `config` on the allocated nodes."""
    target = Target.of(config, config_path, overrides, job, cwd)
    slurm = config["slurm"]
    lines = ["#!/bin/bash", *_header("a Slurm batch script", job), "# Submit: sbatch THIS_FILE"]
    lines += [f"#SBATCH {directive}" for directive in sbatch_directives(target)]
    lines += ["", "set -euo pipefail", ""]
    if slurm["setup"]:
        lines += ["# slurm.setup", *slurm["setup"], ""]
    lines += _srun_lines(target) if slurm["launch"] == "srun" else _launcher_lines(target)
    return "\n".join(lines) + "\n"


def _pod_config(config: Config, nodes: int, per_node: int) -> Config:
    """The config as the pods use it: the operator's host file instead of
    hosts, the workers' SSH port, the image's own Python and keys."""
    resolved = copy.deepcopy(config)
    launcher = resolved["launcher"]
    launcher.update(hosts=None, hostfile=OPERATOR_HOSTFILE, num_proc=nodes * per_node,
                    ssh_port=resolved["k8s"]["ssh_port"], ssh_identity_file=None, python=None)
    return resolved


def _run_dir_in_pod(config: Config) -> str:
    return posixpath.normpath(posixpath.join(config["k8s"]["workdir"], config["run"]["dir"]))


def _pod_volumes(config: Config) -> tuple[list, list, list]:
    """(volumes, launcher mounts, worker mounts): the config map, a memory-backed
    /dev/shm on the workers, and k8s.runs_volume_claim at run.dir's parent."""
    config_volume = {"name": "dist-bn-config", "configMap": {"name": _config_map_name(config)}}
    config_mount = {"name": "dist-bn-config", "mountPath": CONFIG_MOUNT_PATH, "readOnly": True}
    volumes, launcher_mounts, worker_mounts = [config_volume], [config_mount], [config_mount]
    # NCCL and Horovod exchange data through /dev/shm; a container's default is 64 MB.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    worker_mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    claim = config["k8s"]["runs_volume_claim"]
    if claim is not None:
        runs_parent = posixpath.dirname(_run_dir_in_pod(config))
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": claim}})
        launcher_mounts.append({"name": "runs", "mountPath": runs_parent})
        worker_mounts.append({"name": "runs", "mountPath": runs_parent})
    return volumes, launcher_mounts, worker_mounts


def _config_map_name(config: Config) -> str:
    return f"{config['cluster']['job_name']}-run-config"  # the operator itself makes NAME-config


def _worker_resources(config: Config, per_node: int) -> dict:
    """A worker pod's requests and limits: CPUs for its ranks, memory, GPUs."""
    cluster = config["cluster"]
    requests, limits = {}, {}
    if cluster["cpus_per_rank"] is not None:
        requests["cpu"] = str(cluster["cpus_per_rank"] * per_node)
    if cluster["memory_gb"] is not None:
        requests["memory"] = limits["memory"] = f"{cluster['memory_gb']}Gi"
    if cluster["gpus_per_node"]:
        limits["nvidia.com/gpu"] = cluster["gpus_per_node"]
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _launcher_container(config: Config, job: Job, mounts: list) -> dict:
    """The launcher pod's container: dist-bn-launch on the mounted config, once the host file exists."""
    k8s = config["k8s"]
    config_file = posixpath.join(CONFIG_MOUNT_PATH, CONFIG_FILE_NAME)
    args = ["launcher", "dist-bn-launch"] + (["verify"] if job.verify else []) + [config_file]
    if job.verify and job.verify_args:
        args += ["--", *job.verify_args]
    return {
        "name": "launcher",
        "image": config["cluster"]["image"],
        "imagePullPolicy": k8s["image_pull_policy"],
        "workingDir": k8s["workdir"],
        "args": args,
        # Also waits where the operator has no launcherCreationPolicy (before v0.5).
        "env": [{"name": "WAIT_FOR_HOSTFILE", "value": OPERATOR_HOSTFILE},
                {"name": "SSH_PORT", "value": str(k8s["ssh_port"])},
                {"name": "WAIT_TIMEOUT", "value": "600"}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
        "volumeMounts": mounts,
    }


def _worker_container(config: Config, mounts: list, per_node: int) -> dict:
    """A worker pod's container: the image's SSH server, ready when it answers."""
    k8s, port = config["k8s"], config["k8s"]["ssh_port"]
    container = {
        "name": "worker",
        "image": config["cluster"]["image"],
        "imagePullPolicy": k8s["image_pull_policy"],
        "workingDir": k8s["workdir"],
        "args": ["worker"],
        "env": [{"name": "SSH_PORT", "value": str(port)},
                {"name": "SSH_KEYS_DIR", "value": SSH_AUTH_MOUNT_PATH}],
        "ports": [{"name": "ssh", "containerPort": port}],
        "readinessProbe": {"tcpSocket": {"port": port}, "initialDelaySeconds": 2, "periodSeconds": 5},
        "volumeMounts": mounts,
    }
    resources = _worker_resources(config, per_node)
    if resources:
        container["resources"] = resources
    return container


def _replica(replicas: int, container: dict, volumes: list, labels: dict) -> dict:
    return {"replicas": replicas, "restartPolicy": "Never",
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [container], "volumes": volumes}}}


def mpijob_manifest(config: Config, job: Job) -> str:
    """A ConfigMap with the resolved config and an MPIJob that runs `job`."""
    nodes, per_node = cluster_shape(config)
    cluster, k8s = config["cluster"], config["k8s"]
    if cluster["image"] is None:
        raise ConfigError("cluster.image: --emit k8s-mpijob needs the image the pods run, with dist_bn "
                          "installed (build docker/Dockerfile.gpu, push it, then cluster.image=REGISTRY/dist-bn:TAG)")
    name, namespace = cluster["job_name"], k8s["namespace"]
    volumes, launcher_mounts, worker_mounts = _pod_volumes(config)
    launcher_volumes = [v for v in volumes if v["name"] in {m["name"] for m in launcher_mounts}]
    labels = {"app.kubernetes.io/name": "dist-bn", "app.kubernetes.io/instance": name}

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": _config_map_name(config), "namespace": namespace, "labels": labels},
        "data": {CONFIG_FILE_NAME: _dump(_pod_config(config, nodes, per_node))},
    }
    mpijob = {
        "apiVersion": MPIJOB_API_VERSION,
        "kind": "MPIJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "slotsPerWorker": per_node,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
            "sshAuthMountPath": SSH_AUTH_MOUNT_PATH,
            "mpiImplementation": "OpenMPI",
            # The launcher starts once every worker's SSH server answers (readinessProbe).
            "launcherCreationPolicy": "WaitForWorkersReady",
            "mpiReplicaSpecs": {
                "Launcher": _replica(1, _launcher_container(config, job, launcher_mounts), launcher_volumes,
                                     labels),
                "Worker": _replica(nodes, _worker_container(config, worker_mounts, per_node), volumes, labels),
            },
        },
    }
    header = _header("a Kubeflow MPIJob (MPI Operator v2)", job) + [
        "# Apply: kubectl apply -f THIS_FILE; logs: kubectl logs -f -n "
        f"{namespace} job/{name}-launcher (or the {name}-launcher pod)",
    ]
    documents = [_dump(doc) for doc in (config_map, mpijob)]
    return "\n".join(header) + "\n---\n" + "---\n".join(documents)


def emit(kind: str, config: Config, config_path: str, overrides: Sequence[str], job: Job,
         cwd: str | None = None) -> str:
    """The text of a `kind` file (one of EMIT_KINDS) for `config`."""
    if kind == "slurm":
        return slurm_script(config, config_path, overrides, job, cwd)
    if kind == "k8s-mpijob":
        return mpijob_manifest(config, job)
    raise ValueError(f"unknown kind {kind!r}")


__all__ = ["EMIT_KINDS", "Job", "cluster_shape", "emit", "mpijob_manifest", "slurm_script", "slurm_time"]
