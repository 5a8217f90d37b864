"""dist-bn-launch --emit slurm / k8s-mpijob: the files are valid for their tools
and start the same job as the config.

Slurm: bash -n, #SBATCH lines before the first command, then the script run
for real with fake scontrol, srun and python on PATH. MPIJob: parsed with
yaml and checked field by field against the MPI Operator's v2beta1 structure;
the embedded config loads with launch.config.load_config.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.config import load_config
from launch.emit import Job, cluster_shape, mpijob_manifest, slurm_script, slurm_time
from paths import REPO

PROG = "dist-bn-launch"

RECORDER = """\
#!{python}
# Fake {name}: records argv, the working directory and the environment.
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"name": "{name}", "argv": sys.argv[1:], "cwd": os.getcwd(),
                         "env": dict(os.environ)}}) + "\\n")
"""
FAKE_SCONTROL = """\
#!/bin/sh
# Fake scontrol: `scontrol show hostnames NODELIST` for node[01-02] style lists.
[ "$1 $2" = "show hostnames" ] || exit 64
echo gpu-node01
echo gpu-node02
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def emit_text(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def emit_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """scontrol, srun and a python first on PATH; returns the record file."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for name in ("srun", "python"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable, name=name))
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    return bin_dir, record


def run_batch_script(path: Path, record: Path, env_extra: dict | None = None) -> list[dict]:
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu-node[01-02]", **(env_extra or {}))
    result = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


MULTI_NODE = """\
    launcher:
      num_proc: 8
      hosts: a:4,b:4
      network_interfaces: [eth0]
      ssh_port: 2222
      env: {NCCL_DEBUG: WARN}
    horovod: {fusion_threshold_mb: 64}
    cluster: {gpus_per_node: 4, cpus_per_rank: 8, memory_gb: 200, image: reg.example/dist-bn:gpu, job_name: bn-try}
    slurm: {partition: gpu, account: proj1, time_minutes: 1500, output: logs/%x-%j.out,
            directives: [--qos=high, --exclusive], setup: ["export FROM_SETUP=1"]}
    """


# --- the cluster shape -----------------------------------------------------------


@pytest.mark.parametrize("text, shape", [
    ("", (1, 2)),
    ("launcher: {num_proc: 16, hosts: 'n1:8,n2:8'}", (2, 8)),
    ("launcher: {num_proc: 16}\ncluster: {nodes: 4}", (4, 4)),
    ("launcher: {num_proc: 16}\ncluster: {ranks_per_node: 8}", (2, 8)),
    ("launcher: {num_proc: 6, hosts: 'n1:4,n2:2'}\ncluster: {nodes: 3, ranks_per_node: 2}", (3, 2)),
])
def test_cluster_shape(tmp_path, text, shape):
    assert cluster_shape(load_config(write(tmp_path, text))) == shape


@pytest.mark.parametrize("text, message", [
    ("launcher: {num_proc: 6, hosts: 'n1:4,n2:2'}", "launcher.hosts has nodes with different slot counts"),
    ("launcher: {num_proc: 6, hosts: 'n1:4,n2:4'}", "the job would get 2 node(s) x 4 rank(s) = 8 slots"),
    ("launcher: {num_proc: 6}\ncluster: {nodes: 4}", "do not split evenly over 4 nodes"),
    ("launcher: {num_proc: 6}\ncluster: {ranks_per_node: 4}", "do not fill nodes of 4"),
])
def test_cluster_shape_errors(tmp_path, capsys, text, message):
    err = emit_error(capsys, str(write(tmp_path, text)), "--emit", "slurm")
    assert message in err


def test_nodes_times_ranks_must_match_num_proc_everywhere(tmp_path):
    from launch.config import ConfigError
    with pytest.raises(ConfigError, match="cluster.nodes x cluster.ranks_per_node = 2 x 4 = 8 but "
                                          "launcher.num_proc is 2"):
        load_config(write(tmp_path, "cluster: {nodes: 2, ranks_per_node: 4}"))


@pytest.mark.parametrize("minutes, text", [(1, "00:01:00"), (60, "01:00:00"), (1500, "1-01:00:00"),
                                           (2880, "2-00:00:00")])
def test_slurm_time(minutes, text):
    assert slurm_time(minutes) == text


# --- Slurm --------------------------------------------------------------------------


def directives(script: str) -> list[str]:
    """#SBATCH options, checking that they all come before the first command
    (sbatch stops reading them there)."""
    found, commands_started = [], False
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            assert not commands_started, f"#SBATCH after a command: {line}"
            found.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            commands_started = True
    return found


def test_slurm_script_directives_and_syntax(tmp_path, capsys):
    path = write(tmp_path, MULTI_NODE)
    script = emit_text(capsys, str(path), "train.epochs=2", "--emit", "slurm")
    assert script.startswith("#!/bin/bash\n")
    assert directives(script) == [
        "--job-name=bn-try", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
        "--mem=200G", "--time=1-01:00:00", "--partition=gpu", "--account=proj1", "--output=logs/%x-%j.out",
        f"--chdir={os.getcwd()}", "--qos=high", "--exclusive",
    ]
    assert f"# dist_bn training job as a Slurm batch script, written by: {PROG} {path} train.epochs=2 " \
           "--emit slurm" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_slurm_cpu_job_has_no_gpu_or_optional_lines(tmp_path, capsys):
    script = emit_text(capsys, str(write(tmp_path, "")), "--emit", "slurm")
    assert directives(script) == ["--job-name=dist-bn", "--nodes=1", "--ntasks-per-node=2", "--time=01:00:00",
                                  f"--chdir={os.getcwd()}"]


def test_slurm_script_runs_dist_bn_launch_with_the_allocated_nodes(tmp_path, capsys, fakes):
    _, record = fakes
    path = write(tmp_path, MULTI_NODE)
    out = tmp_path / "job.sbatch"
    assert main([str(path), "train.epochs=2", "launcher.python=python", "--emit", "slurm",
                 "--output", str(out)]) == 0
    assert f"wrote {out} (slurm)" in capsys.readouterr().err
    assert os.access(out, os.X_OK)
    calls = run_batch_script(out, record)
    assert len(calls) == 1 and calls[0]["name"] == "python"
    argv = calls[0]["argv"]
    assert argv == ["-m", "launch", str(path), "train.epochs=2", "launcher.python=python",
                    "launcher.hosts=gpu-node01:4,gpu-node02:4"]
    assert calls[0]["env"]["FROM_SETUP"] == "1"  # slurm.setup ran first
    # What the job would then run is a valid launch for those hosts.
    dry = subprocess.run([sys.executable, "-m", "launch", *argv[2:], "--dry-run"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert dry.returncode == 0, dry.stderr
    command = shlex.split(dry.stdout.splitlines()[-1])
    assert command[command.index("-H") + 1] == "gpu-node01:4,gpu-node02:4"
    assert command[command.index("-np") + 1] == "8"


def test_slurm_hostfile_is_replaced_by_the_allocation(tmp_path, capsys):
    path = write(tmp_path, "launcher: {hostfile: /cluster/hosts, num_proc: 8}\ncluster: {nodes: 2}")
    script = emit_text(capsys, str(path), "--emit", "slurm")
    assert 'launcher.hostfile=null "launcher.hosts=$hosts"' in script


def test_slurm_srun_mode_starts_every_rank_with_srun(tmp_path, capsys, fakes):
    _, record = fakes
    path = write(tmp_path, MULTI_NODE)
    out = tmp_path / "srun.sbatch"
    assert main([str(path), "slurm.launch=srun", "slurm.srun_mpi=pmi2", "--emit", "slurm",
                 "--output", str(out)]) == 0
    text = out.read_text()
    assert "scontrol" not in text
    calls = run_batch_script(out, record)
    assert [c["name"] for c in calls] == ["srun"]
    argv, env = calls[0]["argv"], calls[0]["env"]
    assert argv[:6] == ["--mpi=pmi2", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpu-bind=none",
                        "--kill-on-bad-exit=1"]
    assert argv[6:] == [sys.executable, "-m", "dist_bn.training", str(path), "slurm.launch=srun",
                        "slurm.srun_mpi=pmi2", f"run.dir={os.getcwd()}/runs/demo"]
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(64 * 1024 * 1024)
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["NCCL_SOCKET_IFNAME"] == env["OMPI_MCA_btl_tcp_if_include"] == "eth0"


def test_slurm_verify_job(tmp_path, capsys, fakes):
    _, record = fakes
    path = write(tmp_path, MULTI_NODE)
    out = tmp_path / "verify.sbatch"
    assert main(["verify", str(path), "launcher.python=python", "--emit", "slurm", "--output", str(out),
                 "--", "--process-sets", "all", "node"]) == 0
    assert "# dist-bn-verify as a Slurm batch script" in out.read_text()
    calls = run_batch_script(out, record)
    assert calls[0]["argv"] == ["-m", "launch", "verify", str(path), "launcher.python=python",
                                "launcher.hosts=gpu-node01:4,gpu-node02:4", "--", "--process-sets", "all", "node"]


def test_slurm_srun_verify_job(tmp_path, capsys):
    job = Job(verify=True, verify_args=("--dtypes", "float32"))
    config = load_config(write(tmp_path, "slurm: {launch: srun}"))
    script = slurm_script(config, str(tmp_path / "job.yaml"), [], job, cwd=str(tmp_path))
    assert script.rstrip().endswith(f"{sys.executable} -m dist_bn.verify --dtypes float32")


def test_slurm_script_quotes_everything(tmp_path, capsys, fakes):
    _, record = fakes
    path = write(tmp_path, "", name="my job.yaml")
    out = tmp_path / "q.sbatch"
    assert main([str(path), "run.dir=runs/a b", "launcher.python=python", "--emit", "slurm",
                 "--output", str(out)]) == 0
    calls = run_batch_script(out, record)
    assert calls[0]["argv"][2:4] == [str(path), "run.dir=runs/a b"]


def test_output_never_overwrites(tmp_path, capsys):
    path = write(tmp_path, "")
    out = tmp_path / "exists.sh"
    out.write_text("keep me")
    err = emit_error(capsys, str(path), "--emit", "slurm", "--output", str(out))
    assert f"--output: {out} already exists; not overwritten" in err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["--output", "x.sh"], "--output needs --emit"),
    (["--emit", "slurm", "--dry-run"], "pick one"),
    (["--emit", "pbs"], "invalid choice: 'pbs'"),
])
def test_emit_usage_errors(tmp_path, capsys, argv, message):
    path = write(tmp_path, "")
    with pytest.raises(SystemExit) as info:
        main([str(path), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_emit_does_not_need_a_launcher_or_a_free_run_dir(tmp_path, capsys, monkeypatch):
    """Emitting happens on a login node or laptop: no horovodrun, a used run.dir."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty) + os.pathsep + "/usr/bin:/bin")
    monkeypatch.setattr(sys, "executable", "/opt/venv/bin/python")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "x").write_text("used")
    assert "exec /opt/venv/bin/python -m launch" in emit_text(capsys, str(write(tmp_path, "")), "--emit", "slurm")


def test_bad_directive_is_refused(tmp_path, capsys):
    path = write(tmp_path, "slurm: {directives: [qos=high]}")
    assert "slurm.directives: 'qos=high' is not an sbatch option" in emit_error(capsys, str(path), "--emit", "slurm")


# --- Kubeflow MPIJob -------------------------------------------------------------------

K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def check_pod_template(template: dict, volumes_needed: bool = True) -> dict:
    """A PodTemplateSpec's required structure; returns its one container."""
    spec = template["spec"]
    containers = spec["containers"]
    assert isinstance(containers, list) and len(containers) == 1
    container = containers[0]
    assert K8S_NAME.fullmatch(container["name"])
    assert isinstance(container["image"], str) and container["image"]
    assert all(isinstance(a, str) for a in container["args"])
    declared = {v["name"] for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in declared, mount
        assert mount["mountPath"].startswith("/")
    for volume in spec.get("volumes", []):
        assert len(set(volume) - {"name"}) == 1, volume  # exactly one volume source
    for env in container.get("env", []):
        assert set(env) == {"name", "value"} and isinstance(env["value"], str)
    return container


def test_mpijob_structure(tmp_path, capsys):
    path = write(tmp_path, MULTI_NODE + "k8s: {namespace: research, runs_volume_claim: bn-runs}\n")
    text = emit_text(capsys, str(path), "train.epochs=2", "--emit", "k8s-mpijob")
    assert text.startswith("# dist_bn training job as a Kubeflow MPIJob")
    config_map, job = documents(text)

    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["kind"] == "MPIJob"
    for doc in (config_map, job):
        assert K8S_NAME.fullmatch(doc["metadata"]["name"]) and doc["metadata"]["namespace"] == "research"
    assert job["metadata"]["name"] == "bn-try"

    spec = job["spec"]
    assert spec["slotsPerWorker"] == 4
    assert spec["sshAuthMountPath"] == "/root/.ssh"
    assert spec["mpiImplementation"] == "OpenMPI"
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"}
    assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2

    launcher = check_pod_template(replicas["Launcher"]["template"])
    worker = check_pod_template(replicas["Worker"]["template"])
    assert launcher["image"] == worker["image"] == "reg.example/dist-bn:gpu"
    assert launcher["args"] == ["launcher", "dist-bn-launch", "/etc/dist-bn/config.yaml"]
    launcher_env = {e["name"]: e["value"] for e in launcher["env"]}
    assert launcher_env["WAIT_FOR_HOSTFILE"] == "/etc/mpi/hostfile" and launcher_env["SSH_PORT"] == "2222"
    assert worker["args"] == ["worker"]
    assert worker["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": 4}
    assert worker["resources"]["requests"] == {"cpu": "32", "memory": "200Gi"}
    assert "nvidia.com/gpu" not in launcher["resources"].get("limits", {})
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["SSH_PORT"] == "2222" and worker["readinessProbe"]["tcpSocket"]["port"] == 2222
    assert worker["ports"] == [{"name": "ssh", "containerPort": 2222}]
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/workspace/runs"] == "runs"
    volumes = {v["name"]: v for v in replicas["Worker"]["template"]["spec"]["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "bn-runs"}
    assert volumes["dist-bn-config"]["configMap"]["name"] == config_map["metadata"]["name"]


def test_mpijob_config_is_the_resolved_config_for_the_pods(tmp_path, capsys):
    path = write(tmp_path, MULTI_NODE)
    config_map, _ = documents(emit_text(capsys, str(path), "train.epochs=2", "--emit", "k8s-mpijob"))
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(config_map["data"]["config.yaml"])
    pod = load_config(pod_file)  # valid for the launcher and every rank in the pods
    original = load_config(path, ["train.epochs=2"])
    assert pod["train"]["epochs"] == 2
    assert pod["launcher"]["hostfile"] == "/etc/mpi/hostfile" and pod["launcher"]["hosts"] is None
    assert pod["launcher"]["ssh_port"] == 2222 and pod["launcher"]["python"] is None
    for section in ("model", "data", "train", "run", "horovod"):
        assert pod[section] == original[section]
    assert pod["launcher"]["env"] == original["launcher"]["env"]
    assert pod["launcher"]["network_interfaces"] == ["eth0"]


def test_mpijob_verify(tmp_path, capsys):
    path = write(tmp_path, MULTI_NODE)
    _, job = documents(emit_text(capsys, "verify", str(path), "--emit", "k8s-mpijob", "--", "--dtypes", "float32"))
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["args"] == ["launcher", "dist-bn-launch", "verify", "/etc/dist-bn/config.yaml", "--",
                                "--dtypes", "float32"]


def test_mpijob_cpu_job_has_no_gpu_resources(tmp_path):
    config = load_config(write(tmp_path, "cluster: {image: dist-bn:cpu}"))
    _, job = documents(mpijob_manifest(config, Job()))
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "resources" not in worker
    assert job["spec"]["slotsPerWorker"] == 2 and job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 1


def test_mpijob_needs_an_image(tmp_path, capsys):
    err = emit_error(capsys, str(write(tmp_path, "")), "--emit", "k8s-mpijob")
    assert "cluster.image: --emit k8s-mpijob needs the image the pods run" in err


@pytest.mark.parametrize("key, value", [("cluster.job_name", "Bad_Name"), ("k8s.namespace", "-x"),
                                        ("k8s.workdir", "relative")])
def test_kubernetes_names_are_checked(tmp_path, capsys, key, value):
    err = emit_error(capsys, str(write(tmp_path, "")), f"{key}={value}", "--emit", "k8s-mpijob")
    assert key in err


def test_emitted_yaml_has_no_aliases(tmp_path, capsys):
    text = emit_text(capsys, str(write(tmp_path, MULTI_NODE)), "--emit", "k8s-mpijob")
    assert not re.search(r"[&*]id\d+", text)


# --- injection: what an attacker would put on the command line or in the config ---------

SHELL_PAYLOAD = "x\ntouch pwned #"
POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: pwned}\nspec: {containers: [{name: c, image: evil}]}"


def run_in_sandbox(script: Path, record: Path, sandbox: Path) -> subprocess.CompletedProcess:
    """bash `script` in an empty directory with scontrol, srun and python stubbed
    (the `fakes` fixture), so whatever it runs happens there and is recorded."""
    sandbox.mkdir()
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu-node[01-02]")
    return subprocess.run(["bash", str(script)], cwd=sandbox, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("kind", ["slurm", "k8s-mpijob"])
@pytest.mark.parametrize("override", [f"run.dir={SHELL_PAYLOAD}", f"run.dir={POD}",
                                      "slurm.partition=gpu\r\n#SBATCH --qos=top", "run.dir=a\u2028b",
                                      "launcher.env.X=\x1b[2J"])
def test_control_characters_in_an_override_are_refused_and_nothing_is_written(tmp_path, capsys, kind, override):
    path = write(tmp_path, "cluster: {image: reg.example/dist-bn:gpu}")
    out = tmp_path / "job.out"
    err = emit_error(capsys, str(path), override, "--emit", kind, "--output", str(out))
    assert "command line: " in err and "an override must be one printable line" in err
    assert not out.exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", [
    'run: {dir: "x\\ntouch pwned #"}',
    "run:\n  dir: |\n    " + POD.replace("\n", "\n    "),
    'slurm: {setup: ["module load x\\n#SBATCH --qos=top"]}',
    'launcher: {env: {A: "1\\u0085B=2"}}',
    'cluster: {image: "img\\rx"}',
])
def test_control_characters_in_config_strings_are_refused(tmp_path, capsys, text):
    path = write(tmp_path, text)
    err = emit_error(capsys, str(path), "--emit", "slurm")
    assert "must be printable text on one line" in err


def test_slurm_header_and_arguments_cannot_become_commands(tmp_path, capsys, fakes):
    """Arguments that are not config values (dist-bn-verify's, after --) reach
    the script's header comment and its command line: escaped in the comment,
    quoted on the command line. Run for real, the script creates nothing."""
    _, record = fakes
    path = write(tmp_path, "")
    out = tmp_path / "verify.sbatch"
    assert main(["verify", str(path), "launcher.python=python", "--emit", "slurm", "--output", str(out),
                 "--", SHELL_PAYLOAD, "$(touch pwned2)", "`touch pwned3`"]) == 0
    capsys.readouterr()
    text = out.read_text()
    header = text.splitlines()[1]
    assert header.startswith("# dist-bn-verify as a Slurm batch script") and "x\\ntouch pwned #" in header
    assert "\ntouch pwned" not in text.split("exec ", 1)[0]  # no line of the script starts with the payload
    result = run_in_sandbox(out, record, tmp_path / "sandbox")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "sandbox")) == [] and not list(tmp_path.glob("pwned*"))
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["name"] for c in calls] == ["python"]
    assert calls[0]["argv"][-4:] == ["--", SHELL_PAYLOAD, "$(touch pwned2)", "`touch pwned3`"]


def test_mpijob_header_and_arguments_cannot_add_objects(tmp_path, capsys):
    path = write(tmp_path, "cluster: {image: reg.example/dist-bn:gpu}")
    out = tmp_path / "mpijob.yaml"
    assert main(["verify", str(path), "--emit", "k8s-mpijob", "--output", str(out), "--", "\n---\n" + POD]) == 0
    capsys.readouterr()
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "MPIJob"]
    launcher = docs[1]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["args"][-1] == "\n---\n" + POD  # one argument, as given


def test_a_working_directory_with_a_newline_is_refused(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "")
    odd = tmp_path / "a\nb"
    odd.mkdir()
    monkeypatch.chdir(odd)
    err = emit_error(capsys, str(path), "--emit", "slurm")
    assert "--chdir: the directory" in err and "control character" in err
