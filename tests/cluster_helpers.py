"""Test hosts made on this machine: an SSH server run by docker/entrypoint.sh,
and two "hosts" as Linux network namespaces joined by a veth pair.

Everything here is for tests: nothing talks to an address outside the
namespaces it made (10.200.N.1 and 10.200.N.2 exist only inside them), every
process it starts is stopped by its id, and the namespaces, their /etc/netns
files and the temporary directories are removed again, also on failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SSHD = "/usr/sbin/sshd"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def ensure_sshd() -> str:
    """The sshd binary; installs openssh-server from apt when it is missing
    (root only, services kept from starting), else skips the test."""
    if os.path.exists(SSHD):
        return SSHD
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("openssh-server is not installed and cannot be installed here (needs root and apt-get)")
    made_policy = False
    if not POLICY_RC_D.exists():  # keep the package's postinst from starting sshd on port 22
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        steps = [["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"]]
        for step in steps:
            result = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.skip(f"could not install openssh-server ({' '.join(step)}): {result.stderr.strip()[-300:]}")
    finally:
        if made_policy:
            POLICY_RC_D.unlink()
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server installed but /usr/sbin/sshd is missing")
    return SSHD


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process this module started: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def wait_for_log(process: subprocess.Popen, log: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {log} (exit {process.poll()}):\n{log.read_text(errors='replace')}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_shim(directory: Path) -> Path:
    """A directory with an `ssh` that never prompts and writes no known_hosts
    (what docker/ssh_config does in the images), to put first on PATH for
    horovodrun and mpirun without touching ~/.ssh."""
    directory.mkdir(parents=True, exist_ok=True)
    real = shutil.which("ssh") or "/usr/bin/ssh"
    shim = directory / "ssh"
    shim.write_text(f'#!/bin/sh\nexec {real} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null '
                    f'-o LogLevel=ERROR -o BatchMode=yes "$@"\n')
    shim.chmod(0o755)
    return directory


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None (tried for real)."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "needs the ip (iproute2) and unshare (util-linux) commands"
    probe = f"dbnprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot make a network namespace: ip netns add: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """host1 and host2: two network namespaces joined by a veth pair named dbn0
    on both sides (10.200.N.1/24 and 10.200.N.2/24), each with its own host
    name (a UTS namespace), /etc/hosts (/etc/netns/NS/hosts, read by `ip netns
    exec`) and SSH server on port `port` started by docker/entrypoint.sh worker.

    Commands run "on host1" with `on_host1`; the launcher goes there, as on a
    real cluster's first node.
    """

    NIC = "dbn0"

    def __init__(self, workdir: Path, port: int = 2222):
        tag = str(os.getpid() % 10_000_000)
        self.workdir = workdir
        self.port = port
        self.names = {"host1": f"dbn{tag}h1", "host2": f"dbn{tag}h2"}
        self.subnet = 1 + os.getpid() % 250
        self.addresses = {"host1": f"10.200.{self.subnet}.1", "host2": f"10.200.{self.subnet}.2"}
        self.veth = (f"dbn{tag}a", f"dbn{tag}b")
        self.keys = workdir / "keys"
        self.identity = self.keys / "id_ed25519"
        self.bin = ssh_shim(workdir / "bin")
        self.sshd: dict[str, subprocess.Popen] = {}
        self.logs = {host: workdir / f"sshd-{host}.log" for host in self.names}
        self._made: list[str] = []
        self._run_sshd_existed = os.path.isdir("/run/sshd")
        self._etc_netns_existed = os.path.isdir("/etc/netns")

    # -- set-up ---------------------------------------------------------------

    def up(self) -> "TwoHosts":
        for ns in self.names.values():
            _ip("netns", "add", ns)
            self._made.append(ns)
        a, b = self.veth
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for (host, ns), end in zip(self.names.items(), self.veth):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "link", "set", end, "name", self.NIC)
            _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", self.NIC)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", self.NIC, "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in self.addresses.items()))

        keygen = subprocess.run([str(ENTRYPOINT), "keygen", str(self.keys)], capture_output=True, text=True,
                                timeout=60)
        assert keygen.returncode == 0, keygen.stderr
        for host, ns in self.names.items():
            env = dict(os.environ, SSH_PORT=str(self.port), SSH_LISTEN_ADDRESS=self.addresses[host],
                       SSH_KEYS_DIR=str(self.keys), SSHD_RUN_DIR=str(self.workdir / f"sshd-{host}"))
            with open(self.logs[host], "w") as log:
                self.sshd[host] = subprocess.Popen(
                    self._in(host, [str(ENTRYPOINT), "worker"]), env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
        for host, process in self.sshd.items():
            wait_for_log(process, self.logs[host], f"Server listening on {self.addresses[host]} port {self.port}")
        return self

    def _in(self, host: str, argv: list[str]) -> list[str]:
        """argv run inside `host`: its network namespace and host name."""
        return ["ip", "netns", "exec", self.names[host], "unshare", "--uts", "sh", "-c",
                'hostname "$1" && shift && exec "$@"', "sh", host, *argv]

    def on_host1(self, argv: list[str], env: dict | None = None, timeout: float = 300,
                 cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ if env is None else env)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(self._in("host1", argv), env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)

    # -- clean-up -------------------------------------------------------------

    def down(self) -> None:
        for process in self.sshd.values():
            stop(process)
        for ns in self._made:
            # Anything still running inside a namespace was started by this test.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # its end of the veth pair goes with it
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for end in self.veth:  # only left if set-up failed before moving it
            if _ip("link", "show", end, check=False).returncode == 0:
                _ip("link", "del", end, check=False)
        made_dirs = [] if self._run_sshd_existed else ["/run/sshd"]  # entrypoint.sh makes it for sshd
        made_dirs += [] if self._etc_netns_existed else ["/etc/netns"]
        for directory in made_dirs:
            try:
                os.rmdir(directory)  # only if empty
            except OSError:
                pass
