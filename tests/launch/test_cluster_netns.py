"""A real multi-host run on one machine: dist-bn-launch starts dist-bn-verify on
two hosts made as network namespaces, over SSH, on their own addresses only.

Topology (tests/cluster_helpers.py, TwoHosts):

    netns host1  10.200.N.1/24 dbn0 <--veth--> dbn0 10.200.N.2/24  netns host2
      sshd :2222 (entrypoint.sh worker)          sshd :2222 (entrypoint.sh worker)
      dist-bn-launch (the launcher, as on a cluster's first node)

Each namespace has its own host name and /etc/hosts (host1, host2 -> their
10.200.N.x), so `-H host1:1,host2:1` resolves to those addresses and nothing
else. The NIC has the same name on both hosts, which horovodrun --gloo
(--network-interfaces dbn0) and mpirun (-mca btl_tcp_if_include dbn0) need.
Skipped, with the reason, where namespaces cannot be made (no root, no
CAP_NET_ADMIN); CI runs it as root.
"""
from __future__ import annotations

import sys

import pytest

from cluster_helpers import TwoHosts, ensure_sshd, netns_unavailable_reason
from paths import REPO

pytestmark = pytest.mark.cluster

VERIFY_ARGS = ["--dtypes", "float32", "float16", "--process-sets", "all", "node",
               "--cases", "dense_2d_uneven", "conv3d_ndhwc_uneven", "conv3d_ndhwc_offset_1e3"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ensure_sshd()
    two = TwoHosts(tmp_path_factory.mktemp("two-hosts"))
    try:
        yield two.up()
    finally:
        two.down()


def launch_verify(hosts: TwoHosts, *overrides: str):
    argv = [sys.executable, "-m", "launch", "verify", "configs/demo.yaml",
            "launcher.hosts=host1:1,host2:1", f"launcher.ssh_port={hosts.port}",
            f"launcher.ssh_identity_file={hosts.identity}", f"launcher.network_interfaces={hosts.NIC}",
            "launcher.start_timeout=60", *overrides, "--", *VERIFY_ARGS]
    return hosts.on_host1(argv, cwd=REPO, timeout=300)


def check_two_host_run(hosts: TwoHosts, result, backend: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 ranks on 2 node(s) (1+1)" in output, output[-4000:]
    assert "hosts: host1 (rank 0), host2 (rank 1)" in output, output[-4000:]
    assert "passed, 0 failed" in output
    assert " FAIL" not in output
    # The rank on host2 came in over SSH from host1's address on the veth pair.
    host2_log = hosts.logs["host2"].read_text(errors="replace")
    assert f"Accepted publickey for root from {hosts.addresses['host1']}" in host2_log, host2_log
    assert backend in output  # the launcher said what it ran


def test_namespaces_are_separate_hosts(hosts):
    result = hosts.on_host1(["sh", "-c", "hostname; ip -o -4 addr show dev dbn0; getent hosts host2"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "host1"
    assert f"inet {hosts.addresses['host1']}/24" in lines[1]
    assert lines[2].split() == [hosts.addresses["host2"], "host2"]


def test_verify_across_two_hosts_horovodrun_gloo(hosts):
    result = launch_verify(hosts, "launcher.controller=gloo")
    check_two_host_run(hosts, result, "horovodrun")
    assert "(gloo controller" in result.stdout


def test_verify_across_two_hosts_mpirun(hosts):
    result = launch_verify(hosts, "launcher.backend=mpirun", "launcher.controller=mpi")
    check_two_host_run(hosts, result, "mpirun")
    assert "(mpi controller" in result.stdout
