"""launch.command: the exact horovodrun and mpirun command lines and environments."""
from __future__ import annotations

import os
import shlex
import sys
import textwrap
from unittest import mock

import pytest

from launch.command import build_launch
from launch.config import ConfigError, load_config
from launch.preflight import preflight

MPIRUN_FIXED = ["-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib"]


@pytest.fixture
def as_user(monkeypatch):
    """Pretend to run as a regular user (uid 1000) unless a test says root."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def make(tmp_path, text, overrides=(), environ=None):
    """(Launch, worker argv) for a config written to tmp_path/run.yaml."""
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    config = preflight(load_config(path, overrides), cwd=tmp_path)
    launch = build_launch(config, str(path), list(overrides), environ={} if environ is None else environ)
    worker = [config["launcher"]["python"] or sys.executable, "-m", "dist_bn.training", str(path),
              *overrides, f"run.dir={config['run']['dir']}"]
    return launch, worker


# --- horovodrun -----------------------------------------------------------------


def test_horovodrun_defaults(tmp_path, as_user):
    launch, worker = make(tmp_path, "")
    assert launch.argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--mpi", *worker]
    assert worker[-1] == f"run.dir={tmp_path}/runs/demo"
    assert launch.env == {} and launch.forwarded == []


def test_horovodrun_every_option(tmp_path, as_user):
    (tmp_path / "id_key").write_text("key")
    launch, worker = make(tmp_path, """
        launcher:
          controller: mpi
          num_proc: 6
          hosts: [n1:4, n2:4]
          network_interfaces: [eth0, ib0]
          ssh_port: 2222
          ssh_identity_file: id_key
          start_timeout: 90
          python: /opt/py/bin/python
          env: {NCCL_DEBUG: INFO}
          extra_args: [--output-filename, logs]
          verbose: true
        horovod:
          fusion_threshold_mb: 32
          cycle_time_ms: 2.5
          cache_capacity: 0
          timeline_filename: tl.json
          autotune: true
          autotune_log_file: at.csv
          stall_check_warning_time_seconds: 30
          stall_check_shutdown_time_seconds: 300
    """, overrides=["train.epochs=1"])
    assert worker[:4] == ["/opt/py/bin/python", "-m", "dist_bn.training", str(tmp_path / "run.yaml")]
    assert launch.argv == [
        "horovodrun", "-np", "6", "-H", "n1:4,n2:4", "--mpi",
        "--network-interfaces", "eth0,ib0", "-p", "2222", "-i", str(tmp_path / "id_key"),
        "--start-timeout", "90",
        "--fusion-threshold-mb", "32", "--cycle-time-ms", "2.5", "--cache-capacity", "0",
        "--timeline-filename", "tl.json", "--autotune", "--autotune-log-file", "at.csv",
        "--stall-check-warning-time-seconds", "30", "--stall-check-shutdown-time-seconds", "300",
        "--verbose", "--output-filename", "logs",
        "/opt/py/bin/python", "-m", "dist_bn.training", str(tmp_path / "run.yaml"), "train.epochs=1",
        f"run.dir={tmp_path}/runs/demo",
    ]
    assert launch.env == {"NCCL_DEBUG": "INFO"}


def test_horovodrun_hostfile_and_no_stall_check(tmp_path, as_user):
    (tmp_path / "hosts").write_text("a slots=2\nb slots=2\n")
    launch, worker = make(tmp_path, """
        launcher: {hostfile: hosts, num_proc: 4}
        horovod: {stall_check: false}
    """)
    assert launch.argv == ["horovodrun", "-np", "4", "--hostfile", str(tmp_path / "hosts"), "--mpi",
                           "--no-stall-check", *worker]


def test_overrides_reach_the_worker_in_order_with_run_dir_last(tmp_path, as_user):
    overrides = ["run.dir=elsewhere", "model.bn=local", "launcher.env.X=1"]
    launch, worker = make(tmp_path, "", overrides=overrides)
    assert launch.argv[-6:] == ["dist_bn.training", str(tmp_path / "run.yaml"), *overrides,
                                f"run.dir={tmp_path}/elsewhere"]


def test_run_dir_needing_quotes_survives_the_round_trip(tmp_path, as_user):
    launch, _ = make(tmp_path, "run: {dir: 'odd: name #1'}")
    assert launch.argv[-1] == f'run.dir="{tmp_path}/odd: name #1"'
    assert load_config(tmp_path / "run.yaml", [launch.argv[-1]])["run"]["dir"] == f"{tmp_path}/odd: name #1"


def test_horovodrun_accepts_the_command_line(tmp_path, as_user):
    """Parse the built argv with Horovod's own argument parser (no job is run)."""
    horovod_launch = pytest.importorskip("horovod.runner.launch")
    launch, worker = make(tmp_path, """
        launcher:
          hosts: n1:2,n2:2
          num_proc: 4
          network_interfaces: eth0
          ssh_port: 2222
          start_timeout: 60
          verbose: true
        horovod: {fusion_threshold_mb: 16, cycle_time_ms: 5, cache_capacity: 64, timeline_filename: t.json,
                  autotune: true, autotune_log_file: a.csv, stall_check_warning_time_seconds: 10,
                  stall_check_shutdown_time_seconds: 20}
    """)
    with mock.patch.object(sys, "argv", launch.argv):
        args = horovod_launch.parse_args()
    assert (args.num_proc, args.hosts, args.use_mpi, args.nics) == (4, "n1:2,n2:2", True, {"eth0"})
    assert (args.ssh_port, args.start_timeout, args.verbose) == (2222, 60, True)
    assert (args.fusion_threshold_mb, args.cycle_time_ms, args.cache_capacity) == (16, 5.0, 64)
    assert (args.timeline_filename, args.autotune, args.autotune_log_file) == ("t.json", True, "a.csv")
    assert (args.stall_check_warning_time_seconds, args.stall_check_shutdown_time_seconds) == (10, 20)
    assert args.command == worker


# --- mpirun -------------------------------------------------------------------------


def test_mpirun_defaults_as_user(tmp_path, as_user):
    environ = {"PATH": "/usr/bin", "PYTHONPATH": "/src", "HOME": "/root"}
    launch, worker = make(tmp_path, "launcher: {backend: mpirun, controller: mpi}", environ=environ)
    assert launch.argv == ["mpirun", "-np", "2", "-H", "localhost:2", *MPIRUN_FIXED,
                           "-x", "PATH", "-x", "PYTHONPATH", *worker]
    assert launch.env == {} and launch.forwarded == ["PATH", "PYTHONPATH"]


def test_mpirun_as_root_allows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    environ = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/lib", "PYTHONPATH": "/src"}
    launch, worker = make(tmp_path, "launcher: {backend: mpirun, controller: mpi, num_proc: 3}", environ=environ)
    assert launch.argv == ["mpirun", "--allow-run-as-root", "-np", "3", "-H", "localhost:3", *MPIRUN_FIXED,
                           "-x", "PATH", "-x", "LD_LIBRARY_PATH", "-x", "PYTHONPATH", *worker]


def test_horovodrun_never_gets_allow_run_as_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    launch, _ = make(tmp_path, "")
    assert "--allow-run-as-root" not in launch.argv


def test_mpirun_every_option(tmp_path, as_user):
    (tmp_path / "hosts").write_text("# cluster\nn1 slots=4\n\nn2 slots=4 max_slots=8\n")
    (tmp_path / "id_key").write_text("key")
    launch, worker = make(tmp_path, """
        launcher:
          backend: mpirun
          controller: mpi
          num_proc: 8
          hostfile: hosts
          network_interfaces: eth0,eth1
          ssh_port: 2222
          ssh_identity_file: id_key
          start_timeout: 90
          env: {NCCL_DEBUG: WARN, PYTHONPATH: /mine}
          extra_args: [--tag-output]
          verbose: true
        horovod:
          fusion_threshold_mb: 32
          cycle_time_ms: 2.5
          cache_capacity: 512
          timeline_filename: tl.json
          autotune: true
          autotune_log_file: at.csv
          stall_check_warning_time_seconds: 30
          stall_check_shutdown_time_seconds: 300
    """, environ={"PATH": "/usr/bin", "PYTHONPATH": "/src"})
    env = {
        "HOROVOD_START_TIMEOUT": "90",
        "HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024),
        "HOROVOD_CYCLE_TIME": "2.5",
        "HOROVOD_CACHE_CAPACITY": "512",
        "HOROVOD_TIMELINE": "tl.json",
        "HOROVOD_AUTOTUNE": "1",
        "HOROVOD_AUTOTUNE_LOG": "at.csv",
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "30",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "300",
        "NCCL_DEBUG": "WARN",
        "PYTHONPATH": "/mine",
    }
    assert launch.env == env
    assert launch.forwarded == ["PATH", *env]
    assert launch.argv == [
        "mpirun", "-np", "8", "-hostfile", str(tmp_path / "hosts"), *MPIRUN_FIXED,
        "-mca", "btl_tcp_if_include", "eth0,eth1", "-x", "NCCL_SOCKET_IFNAME=eth0,eth1",
        "-mca", "plm_rsh_args", f"-p 2222 -i {tmp_path / 'id_key'}",
        "-x", "PATH", *[arg for name in env for arg in ("-x", name)],
        "--tag-output", *worker,
    ]


def test_mpirun_stall_check_off_sets_the_disable_variable(tmp_path, as_user):
    launch, _ = make(tmp_path, "launcher: {backend: mpirun, controller: mpi}\nhorovod: {stall_check: false}")
    assert launch.env == {"HOROVOD_STALL_CHECK_DISABLE": "1"}
    assert "--no-stall-check" not in launch.argv


def test_child_env_layers_config_env_over_the_shell(tmp_path, as_user):
    launch, _ = make(tmp_path, "launcher: {env: {A: new}}")
    assert launch.child_env({"A": "old", "B": "b"}) == {"A": "new", "B": "b"}


def test_dry_run_text_is_copy_pasteable(tmp_path, as_user):
    from launch.cli import describe
    launch, _ = make(tmp_path, "launcher: {env: {MSG: 'two words'}}")
    lines = [line for line in describe(launch, "horovodrun").splitlines() if not line.startswith("#")]
    assert lines[0] == "export MSG='two words'"
    assert shlex.split(lines[-1]) == launch.argv


@pytest.mark.parametrize("text, expected", [
    ("launcher: {env: {HOROVOD_FUSION_THRESHOLD: '1'}}\nhorovod: {fusion_threshold_mb: 1}",
     "launcher.env: HOROVOD_FUSION_THRESHOLD is also set by horovod.fusion_threshold_mb; keep one of the two"),
    ("launcher: {env: {NCCL_SOCKET_IFNAME: eth1}, network_interfaces: [eth0]}",
     "launcher.env: NCCL_SOCKET_IFNAME is also set by launcher.network_interfaces; keep one of the two"),
    ("launcher: {env: {HOROVOD_STALL_CHECK_DISABLE: '1'}}\nhorovod: {stall_check: false}",
     "launcher.env: HOROVOD_STALL_CHECK_DISABLE is also set by horovod.stall_check; keep one of the two"),
])
def test_env_may_not_fight_a_key(tmp_path, as_user, text, expected):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, text)
    assert str(info.value) == expected


def test_env_may_name_an_unused_knob_variable(tmp_path, as_user):
    launch, _ = make(tmp_path, "launcher: {env: {HOROVOD_CYCLE_TIME: '2'}}")
    assert launch.env == {"HOROVOD_CYCLE_TIME": "2"}
