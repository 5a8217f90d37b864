"""launch.cli: errors (exit 2, one line), --dry-run, exit codes and signal forwarding.

No Horovod job runs here: a fake `horovodrun`/`mpirun` placed first on PATH
records how it was started and then exits, or sleeps until signalled.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.cli import main
from paths import REPO

PROG = "dist-bn-launch"

FAKE_LAUNCHER = """\
#!{python}
# Fake launcher: records argv, environment and session, then acts on FAKE_MODE.
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
with open(out + ".json", "w") as f:
    json.dump({{"argv": sys.argv, "pid": os.getpid(), "env": dict(os.environ),
               "own_session": os.getsid(0) == os.getpid(),
               "stdin_is_devnull": os.path.samefile("/proc/self/fd/0", os.devnull)}}, f)
if os.environ.get("FAKE_MODE") == "rank_error":
    # Like horovodrun when a rank printed its one-line error and exited 2:
    # the rank records its code, horovodrun exits 1 with a traceback of its own.
    with open(os.path.join(os.environ["DIST_BN_EXIT_STATUS_DIR"], "rank-0"), "w") as f:
        f.write("2\\n")
    print("[0]<stderr>:dist_bn.training: error: run.dir: the rank's one line", file=sys.stderr)
    print("Traceback (most recent call last):\\n  File horovodrun\\nRuntimeError: Horovod detected", file=sys.stderr)
    sys.exit(1)
if os.environ.get("FAKE_MODE") == "sleep":
    def stop(signum, frame):
        with open(out + ".signals", "a") as f:
            f.write(f"{{signum}}\\n")
        sys.exit(int(os.environ.get("FAKE_SIGNAL_CODE", 128 + signum)))
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    open(out + ".ready", "w").close()
    time.sleep(60)
    sys.exit(99)
sys.exit(int(os.environ.get("FAKE_CODE", "0")))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Fake horovodrun and mpirun first on PATH; cwd is tmp_path. Returns the
    record prefix: <prefix>.json is written when the fake runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("horovodrun", "mpirun"):
        script = bin_dir / name
        script.write_text(FAKE_LAUNCHER.format(python=sys.executable))
        script.chmod(0o755)
    prefix = tmp_path / "fake"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OUT", str(prefix))
    monkeypatch.chdir(tmp_path)
    return prefix


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(capsys, argv, expected: str) -> None:
    """main(argv) exits 2 with exactly one stderr line containing `expected`."""
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"{PROG}: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert expected in err, err


# --- errors ---------------------------------------------------------------------


def test_out_of_range_message_format(tmp_path, fake, capsys):
    path = write(tmp_path, "launcher:\n  num_proc: -2\n")
    code, out, err = run_main(capsys, str(path))
    assert (code, out) == (2, "")
    assert err == f"{PROG}: error: {path}: launcher.num_proc: must be an integer from 1 to 65536, got -2\n"


@pytest.mark.parametrize("text, overrides, expected", [
    (None, [], "missing.yaml: config file not found"),
    ("train: {epochs: 1\n", [], "run.yaml: invalid YAML: line 2, column 1: "),
    ("[1, 2]\n", [], "run.yaml: the top level must be a mapping of sections"),
    ("train: {batchsize: 2}\n", [], "run.yaml: train.batchsize: unknown key (did you mean train.batch_size?); "
                                    "allowed keys in train: batch_size, "),
    ("train: {batch_size: two}\n", [], "run.yaml: train.batch_size: must be an integer from 1 to 65536, got 'two'"),
    ("model: {bn: batch}\n", [], "run.yaml: model.bn: must be one of sync, local, none; got 'batch'"),
    ("", ["epochs"], "command line: 'epochs': not a key=value override"),
    ("", ["train.epoch=2"], "command line: train.epoch: unknown key (did you mean train.epochs?)"),
    ("", ["launcher.num_proc=-2"], "command line: launcher.num_proc: must be an integer from 1 to 65536, got -2"),
    ("launcher: {backend: mpirun, controller: gloo}\n", [], "launcher.controller: gloo needs launcher.backend: horovodrun; mpirun "
                                          "always starts Horovod's MPI controller"),
    ("launcher: {hosts: 'a:1', num_proc: 2}\n", [], "run.yaml: launcher.hosts: slots add up to 1 but "
                                                    "launcher.num_proc is 2"),
    ("launcher: {hostfile: nohosts}\n", [], "run.yaml: launcher.hostfile: no such file: "),
    ("launcher: {ssh_identity_file: nokey}\n", [], "run.yaml: launcher.ssh_identity_file: no such file: "),
    ("launcher: {env: {HOROVOD_TIMELINE: x}}\nhorovod: {timeline_filename: t.json}\n", [],
     "run.yaml: launcher.env: HOROVOD_TIMELINE is also set by horovod.timeline_filename"),
])
def test_errors_exit_2_with_one_line(tmp_path, fake, capsys, text, overrides, expected):
    path = tmp_path / "missing.yaml" if text is None else write(tmp_path, text)
    assert_error(capsys, [str(path), *overrides], expected)
    assert not Path(f"{fake}.json").exists(), "nothing may start after an error"


def test_missing_file_names_the_path_as_given(tmp_path, fake, capsys):
    assert_error(capsys, ["configs/nope.yaml"], f"{PROG}: error: configs/nope.yaml: config file not found")


def test_hostfile_slots_must_cover_num_proc(tmp_path, fake, capsys):
    (tmp_path / "hosts").write_text("a slots=1\nb slots=2\n")
    path = write(tmp_path, "launcher: {hostfile: hosts, num_proc: 4}\n")
    assert_error(capsys, [str(path)], f"launcher.hostfile: slots in {tmp_path}/hosts add up to 3 but "
                                      "launcher.num_proc is 4")


def test_horovodrun_hostfile_must_be_in_its_format(tmp_path, fake, capsys):
    (tmp_path / "hosts").write_text("a slots=2\n\n# spare\nb slots=2\n")
    path = write(tmp_path, "launcher: {hostfile: hosts, num_proc: 2}\n")
    assert_error(capsys, [str(path)], f"launcher.hostfile: {tmp_path}/hosts line 2: horovodrun needs "
                                      "'hostname slots=N' on every line, no blank or comment lines; got ''")


@pytest.mark.parametrize("backend", ["horovodrun", "mpirun"])
def test_hostfile_host_names_are_checked(tmp_path, fake, capsys, backend):
    (tmp_path / "hosts").write_text("node1 slots=2\n$(reboot) slots=2\n")
    path = write(tmp_path, f"launcher: {{backend: {backend}, controller: mpi, hostfile: hosts, num_proc: 2}}\n")
    assert_error(capsys, [str(path), "--dry-run"],
                 f"launcher.hostfile: {tmp_path}/hosts line 2: host '$(reboot)' is not a host name")


def test_mpirun_hostfile_may_have_comments(tmp_path, fake, capsys):
    (tmp_path / "hosts").write_text("a slots=2\n\n# spare\nb slots=2  # second\n")
    path = write(tmp_path, "launcher: {backend: mpirun, controller: mpi, hostfile: hosts, num_proc: 4}\n")
    code, out, _ = run_main(capsys, str(path), "--dry-run")
    assert code == 0 and f"-hostfile {tmp_path}/hosts" in out


class TestRunDir:
    """An existing non-empty run.dir needs run.resume or run.overwrite."""

    message = ("run.dir: {dir} already exists and is not empty; pick another run.dir, "
               "or set run.resume=true to continue it, or run.overwrite=true to replace it")

    @pytest.fixture
    def used(self, tmp_path):
        (tmp_path / "runs" / "demo").mkdir(parents=True)
        (tmp_path / "runs" / "demo" / ".dist_bn-run").write_text("{}")  # the job's marker
        (tmp_path / "runs" / "demo" / "checkpoint").write_text("x")
        return tmp_path / "runs" / "demo"

    def test_refused(self, tmp_path, fake, capsys, used):
        path = write(tmp_path, "")
        assert_error(capsys, [str(path)], f"{path}: " + self.message.format(dir=used))

    def test_relative_dir_is_resolved_against_cwd(self, tmp_path, fake, capsys, used):
        path = write(tmp_path, "run: {dir: runs/demo}")
        assert_error(capsys, [str(path), "--dry-run"], self.message.format(dir=used))

    @pytest.mark.parametrize("flag", ["run.resume=true", "run.overwrite=true"])
    def test_allowed_when_told(self, tmp_path, fake, capsys, used, flag):
        code, out, _ = run_main(capsys, str(write(tmp_path, "")), flag, "--dry-run")
        assert code == 0 and f"{flag} run.dir={used}" in out

    def test_empty_dir_is_fine(self, tmp_path, fake, capsys):
        (tmp_path / "runs" / "demo").mkdir(parents=True)
        code, _, _ = run_main(capsys, str(write(tmp_path, "")), "--dry-run")
        assert code == 0

    @pytest.mark.parametrize("flag", ["run.resume=true", "run.overwrite=true"])
    def test_a_directory_the_job_did_not_make_is_refused(self, tmp_path, fake, capsys, flag):
        foreign = tmp_path / "src"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        assert_error(capsys, [str(write(tmp_path, "")), f"run.dir={foreign}", flag, "--dry-run"],
                     f"run.dir: {foreign} is not empty and has no .dist_bn-run marker")
        assert sorted(os.listdir(foreign)) == ["notes.txt"]

    @pytest.mark.parametrize("target, message", [
        ("/etc", "/etc is in the system directory /etc, never a run directory"),
        ("/usr/local/runs", "/usr/local/runs is in the system directory /usr"),
        ("/", "/ is a system directory, never a run directory"),
        ("'~'", "is the home directory, never a run directory"),
    ])
    @pytest.mark.parametrize("flag", ["run.resume=true", "run.overwrite=true", "run.tensorboard=true"])
    def test_system_and_home_directories_are_always_refused(self, tmp_path, fake, capsys, target, message, flag):
        assert_error(capsys, [str(write(tmp_path, "")), f"run.dir={target}", flag, "--dry-run"], message)

    def test_symlinks_are_resolved_first(self, tmp_path, fake, capsys):
        (tmp_path / "innocent").symlink_to("/etc")
        assert_error(capsys, [str(write(tmp_path, "")), "run.dir=innocent", "run.overwrite=true", "--dry-run"],
                     "run.dir: /etc is in the system directory /etc")

    def test_file_in_the_way(self, tmp_path, fake, capsys):
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "demo").write_text("x")
        assert_error(capsys, [str(write(tmp_path, "")), "run.resume=true"],
                     f"run.dir: {tmp_path}/runs/demo exists and is not a directory; pick another run.dir")


@pytest.mark.parametrize("backend, hint", [
    ("horovodrun", "horovodrun not found on PATH; install Horovod with `bash scripts/bootstrap.sh`"),
    ("mpirun", "mpirun not found on PATH; install Open MPI with `bash scripts/bootstrap.sh`"),
])
def test_launcher_not_installed(tmp_path, capsys, monkeypatch, backend, hint):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))  # no venv bin/ to fall back on
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, f"launcher: {{backend: {backend}, controller: mpi}}\n")
    assert_error(capsys, [str(path), "--dry-run"], f"{path}: launcher.backend: {hint}")


def test_launcher_next_to_python_is_found_without_activating(tmp_path, capsys, monkeypatch):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "horovodrun").write_text("#!/bin/sh\n")
    (venv_bin / "horovodrun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, str(write(tmp_path, "")), "--dry-run")
    assert code == 0
    assert out.splitlines()[-1].startswith(f"{venv_bin}/horovodrun -np 2 -H localhost:2 --mpi {venv_bin}/python ")


def test_no_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: CONFIG.yaml" in capsys.readouterr().err


def test_errors_print_no_traceback(tmp_path):
    """Through the real entry point: one line on stderr, exit 2."""
    path = write(tmp_path, "launcher: {num_proc: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "launch", str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"{PROG}: error: {path}: launcher.num_proc: must be an integer from 1 to 65536, got 0\n"


# --- dry run ---------------------------------------------------------------------


def test_dry_run_prints_environment_and_command_and_starts_nothing(tmp_path, fake, capsys):
    path = write(tmp_path, "launcher: {env: {NCCL_DEBUG: WARN, MSG: 'a b'}}\n")
    code, out, err = run_main(capsys, str(path), "train.epochs=1", "--dry-run")
    assert (code, err) == (0, "")
    worker = [sys.executable, "-m", "dist_bn.training", str(path), "train.epochs=1", f"run.dir={tmp_path}/runs/demo"]
    assert out == "\n".join([
        f"# {PROG}: dry run, nothing was started.",
        "# Environment: this shell's, plus (every rank inherits it):",
        "export NCCL_DEBUG=WARN",
        "export MSG='a b'",
        "# Command:",
        shlex.join(["horovodrun", "-np", "2", "-H", "localhost:2", "--mpi", *worker]),
    ]) + "\n"
    assert not Path(f"{fake}.json").exists()


def test_dry_run_for_mpirun_lists_forwarded_variables(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    path = write(tmp_path, "launcher: {backend: mpirun, controller: mpi}\nhorovod: {cycle_time_ms: 2}\n")
    code, out, _ = run_main(capsys, "--dry-run", str(path))  # option first works too
    assert code == 0
    lines = out.splitlines()
    assert lines[1:4] == ["# Environment: this shell's, plus (every rank inherits it):",
                          "export HOROVOD_CYCLE_TIME=2.0",
                          "# mpirun forwards to every rank (-x): PATH HOROVOD_CYCLE_TIME"]
    assert lines[-1].startswith("mpirun -np 2 -H localhost:2 -bind-to none -map-by slot -mca pml ob1 "
                                "-mca btl '^openib' -x PATH -x HOROVOD_CYCLE_TIME ")


def test_dry_run_without_extra_environment(tmp_path, fake, capsys):
    code, out, _ = run_main(capsys, str(write(tmp_path, "")), "--dry-run")
    assert code == 0
    assert out.splitlines()[1] == "# Environment: this shell's, unchanged (every rank inherits it)."


@pytest.mark.parametrize("name", ["demo.yaml", "gpu-node.yaml", "multi-node.yaml"])
def test_dry_run_of_shipped_configs(fake, capsys, name):
    code, out, err = run_main(capsys, str(REPO / "configs" / name), "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("horovodrun -np ")


# --- running -------------------------------------------------------------------------


def record(prefix: Path) -> dict:
    return json.loads(Path(f"{prefix}.json").read_text())


@pytest.mark.parametrize("exit_code", [0, 1, 3])
def test_exit_code_is_the_jobs(tmp_path, fake, capsys, monkeypatch, exit_code):
    monkeypatch.setenv("FAKE_CODE", str(exit_code))
    path = write(tmp_path, "launcher: {num_proc: 3, env: {NCCL_DEBUG: INFO}}\n")
    code, out, err = run_main(capsys, str(path), "model.width=4")
    assert code == exit_code
    seen = record(fake)
    worker = [sys.executable, "-m", "dist_bn.training", str(path), "model.width=4", f"run.dir={tmp_path}/runs/demo"]
    assert seen["argv"][1:] == ["-np", "3", "-H", "localhost:3", "--mpi", *worker]
    assert seen["env"]["NCCL_DEBUG"] == "INFO"
    assert seen["own_session"] and seen["stdin_is_devnull"]
    assert err == f"{PROG}: running: {shlex.join(['horovodrun', *seen['argv'][1:]])}\n"


def test_mpirun_exit_code_and_environment(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CODE", "5")
    path = write(tmp_path, "launcher: {backend: mpirun, controller: mpi}\nhorovod: {fusion_threshold_mb: 1}\n")
    code, _, _ = run_main(capsys, str(path))
    assert code == 5
    seen = record(fake)
    assert seen["env"]["HOROVOD_FUSION_THRESHOLD"] == "1048576"
    assert seen["argv"][seen["argv"].index("HOROVOD_FUSION_THRESHOLD") - 1] == "-x"


def test_signal_handlers_are_restored(tmp_path, fake, capsys):
    before = signal.getsignal(signal.SIGINT)
    assert run_main(capsys, str(write(tmp_path, "")))[0] == 0
    assert signal.getsignal(signal.SIGINT) is before


def start_sleeping_job(tmp_path: Path, fake: Path, **extra_env: str) -> subprocess.Popen:
    """`python -m launch` over a fake launcher that sleeps until signalled."""
    path = write(tmp_path, "")
    env = {**os.environ, "FAKE_MODE": "sleep", "PYTHONPATH": str(REPO), **extra_env}
    job = subprocess.Popen([sys.executable, "-m", "launch", str(path)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not Path(f"{fake}.ready").exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "fake launcher did not start"
        time.sleep(0.05)
    return job


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_is_forwarded_once_and_its_exit_code_returned(tmp_path, fake, signum):
    job = start_sleeping_job(tmp_path, fake)
    job.send_signal(signum)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signum, err
    assert Path(f"{fake}.signals").read_text() == f"{int(signum)}\n"
    assert "Traceback" not in err


def test_child_killed_by_a_signal_gives_128_plus_n(tmp_path, fake):
    job = start_sleeping_job(tmp_path, fake)
    os.kill(record(fake)["pid"], signal.SIGKILL)
    job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGKILL


def test_a_signal_gives_128_plus_n_even_when_horovodrun_says_1(tmp_path, fake):
    """horovodrun exits 1 when it stops the ranks for a SIGTERM or SIGINT."""
    job = start_sleeping_job(tmp_path, fake, FAKE_SIGNAL_CODE="1")
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM


def test_the_ranks_exit_code_passes_through_horovodrun(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "rank_error")
    code, _, err = run_main(capsys, str(write(tmp_path, "")))
    assert code == 2
    assert "[0]<stderr>:dist_bn.training: error: run.dir: the rank's one line\n" in err
    assert "Traceback" not in err and "RuntimeError" not in err


def test_horovodruns_own_traceback_is_kept_when_no_rank_said_why(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "rank_error")
    monkeypatch.setenv("FAKE_OUT", str(fake))
    real = fake.parent / "bin" / "horovodrun"
    real.write_text(real.read_text().replace('"rank-0"', '"not-a-rank"'))
    code, _, err = run_main(capsys, str(write(tmp_path, "")))
    assert code == 1 and "Traceback (most recent call last):" in err and "RuntimeError" in err


def test_the_child_dies_with_a_killed_launcher(tmp_path, fake):
    """SIGKILL gives the launcher no chance to forward anything: the kernel's
    parent-death signal stops horovodrun/mpirun (which then stop the ranks)."""
    job = start_sleeping_job(tmp_path, fake)
    child = record(fake)["pid"]
    job.kill()
    job.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not Path(f"{fake}.signals").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(f"{fake}.signals").read_text() == f"{int(signal.SIGTERM)}\n"
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()
