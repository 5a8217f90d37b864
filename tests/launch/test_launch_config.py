"""launch.config: loading, defaults, overrides and every validation error."""
from __future__ import annotations

import textwrap
from pathlib import Path

import json

import pytest

from launch.config import ConfigError, format_override, load_config, parse_override
from launch.schema import FIELDS
from paths import REPO



def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --- loading and defaults ----------------------------------------------------


def test_empty_file_gives_every_default(tmp_path):
    config = load_config(write(tmp_path, ""))
    for field in FIELDS:
        assert config[field.section][field.name] == field.default, field.key
    assert list(config) == ["model", "data", "train", "run", "launcher", "horovod", "cluster", "slurm", "k8s"]


def test_values_are_read_and_rest_defaulted(tmp_path):
    path = write(tmp_path, """
        model: {width: 8, bn: local}
        train:
          learning_rate: 1    # an int is fine for a float key
          mixed_precision: true
        launcher:
          hosts: [a:2, b:2]
          num_proc: 4
          network_interfaces: eth0, eth1
          env: {NCCL_DEBUG: WARN, OMP_NUM_THREADS: 1}
    """)
    config = load_config(path)
    assert config["model"] == {"width": 8, "depth": 3, "bn": "local", "momentum": 0.9}
    assert config["train"]["learning_rate"] == 1.0 and isinstance(config["train"]["learning_rate"], float)
    assert config["train"]["mixed_precision"] is True
    assert config["launcher"]["hosts"] == "a:2,b:2"
    assert config["launcher"]["network_interfaces"] == ["eth0", "eth1"]
    assert config["launcher"]["env"] == {"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "1"}
    assert config["run"]["dir"] == "runs/demo"


def test_sections_with_every_key_commented_out_are_fine(tmp_path):
    config = load_config(write(tmp_path, "horovod:\nlauncher:\n  env:\n  extra_args:\n"))
    assert config["launcher"]["env"] == {} and config["launcher"]["extra_args"] == []


def test_defaults_are_not_shared_between_loads(tmp_path):
    path = write(tmp_path, "")
    load_config(path)["launcher"]["env"]["X"] = "1"
    assert load_config(path)["launcher"]["env"] == {}


def test_yaml_1_1_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads 1e-3 as a string; a float key takes it as the number meant.
    assert load_config(write(tmp_path, "train: {learning_rate: 1e-3}"))["train"]["learning_rate"] == 0.001


@pytest.mark.parametrize("name", ["demo.yaml", "gpu-node.yaml", "multi-node.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "configs" / name)
    assert config["launcher"]["backend"] == "horovodrun"


def test_shipped_configs_explain_their_keys():
    for path in (REPO / "configs").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert text.count("#") >= 10, f"{path.name} should comment its keys"


def test_shipped_demo_is_two_ranks_on_this_machine():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config["launcher"]["num_proc"] == 2
    assert config["launcher"]["hosts"] is None and config["launcher"]["controller"] == "mpi"


# --- overrides ----------------------------------------------------------------


def test_overrides_are_typed_by_yaml(tmp_path):
    path = write(tmp_path, "train: {batch_size: 2}")
    config = load_config(path, [
        "train.batch_size=8",
        "train.mixed_precision=true",
        "train.learning_rate=0.5",
        "launcher.network_interfaces=[eth0, ib0]",
        "launcher.hosts=h1:2,h2:2",
        "launcher.num_proc=4",
        "run.dir=/tmp/some where",
    ])
    assert config["train"]["batch_size"] == 8
    assert config["train"]["mixed_precision"] is True
    assert config["train"]["learning_rate"] == 0.5
    assert config["launcher"]["network_interfaces"] == ["eth0", "ib0"]
    assert config["launcher"]["hosts"] == "h1:2,h2:2"
    assert config["run"]["dir"] == "/tmp/some where"


def test_last_override_wins_and_null_unsets(tmp_path):
    path = write(tmp_path, "launcher: {hosts: 'a:4'}")
    config = load_config(path, ["train.epochs=5", "train.epochs=7", "launcher.hosts=null"])
    assert config["train"]["epochs"] == 7
    assert config["launcher"]["hosts"] is None


def test_override_sets_one_environment_variable(tmp_path):
    path = write(tmp_path, "launcher: {env: {A: '1'}}")
    config = load_config(path, ["launcher.env.B=2", "launcher.env.A=x"])
    assert config["launcher"]["env"] == {"A": "x", "B": "2"}


def test_override_can_fix_a_bad_file_value(tmp_path):
    path = write(tmp_path, "train: {batch_size: -1}")
    assert load_config(path, ["train.batch_size=3"])["train"]["batch_size"] == 3


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size", "command line: 'train.batch_size': not a key=value override (e.g. train.batch_size=8)"),
    ("=3", "command line: '=3': not a key=value override"),
    ("train..x=1", "is not a dotted key path"),
    ("train.batchsize=8", "command line: train.batchsize: unknown key (did you mean train.batch_size?); "
                          "allowed keys in train: batch_size, epochs,"),
    ("trian.epochs=1", "command line: trian: unknown section (did you mean train?); allowed sections: model, data"),
    ("train=3", "command line: train: is a section; override one key at a time, e.g. train.batch_size=..."),
    ("train.epochs.x=1", "command line: train.epochs.x: train.epochs has no sub-keys; write train.epochs=VALUE"),
    ("train.epochs=[1", "command line: train.epochs: value '[1' is not valid YAML: line 1"),
    ("train.epochs=three", "command line: train.epochs: must be an integer from 1 to 1000000, got 'three'"),
    ("launcher.env.1X=a", "command line: launcher.env: '1X' is not a valid environment variable name"),
])
def test_bad_overrides(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, ""), [override])


@pytest.mark.parametrize("value", [
    "/abs/path", "runs/x", "with space", "a: b", "x #y", "", "true", "3", "null", "[a]", "'q'", "*star", "é",
])
def test_format_override_round_trips(value):
    assert parse_override(format_override("run.dir", value)) == ("run.dir", value)


def test_format_override_keeps_plain_paths_plain():
    assert format_override("run.dir", "/work/main/runs/demo") == "run.dir=/work/main/runs/demo"


# --- errors in the file -----------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: config file not found"


def test_directory_instead_of_file(tmp_path):
    assert error_of(tmp_path) == f"{tmp_path}: is a directory, not a config file"


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: [1, 2\n  epochs: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid YAML: line 3, column ")


def test_duplicate_keys_are_an_error(tmp_path):
    path = write(tmp_path, "train: {epochs: 1}\nmodel: {width: 4}\ntrain: {batch_size: 2}\n")
    assert error_of(path) == f"{path}: invalid YAML: line 3, column 1: duplicate key 'train'"


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("42\n", "42"), ("just text\n", "'just text'")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    path = write(tmp_path, text)
    assert error_of(path) == (f"{path}: the top level must be a mapping of sections "
                              f"(model, data, train, run, launcher, horovod, cluster, slurm, k8s), got {got}")


def test_unknown_key_names_file_key_allowed_and_closest(tmp_path):
    path = write(tmp_path, "train:\n  batchsize: 8\n")
    assert error_of(path) == (
        f"{path}: train.batchsize: unknown key (did you mean train.batch_size?); allowed keys in train: "
        "batch_size, epochs, learning_rate, warmup_epochs, optimizer, momentum, mixed_precision, seed, "
        "log_every, checkpoint_every, precise_bn_batches")


def test_unknown_key_without_close_match(tmp_path):
    path = write(tmp_path, "run:\n  zzzz: 1\n")
    assert error_of(path) == f"{path}: run.zzzz: unknown key; allowed keys in run: dir, resume, overwrite, tensorboard"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "lancher: {num_proc: 2}\n")
    assert error_of(path) == (f"{path}: lancher: unknown section (did you mean launcher?); "
                              "allowed sections: model, data, train, run, launcher, horovod, cluster, slurm, k8s")


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "train: [1, 2]\n")
    assert error_of(path) == f"{path}: train: must be a mapping of keys, got a list"


@pytest.mark.parametrize("text, expected", [
    ("launcher: {num_proc: -2}", "launcher.num_proc: must be an integer from 1 to 65536, got -2"),
    ("launcher: {num_proc: 2.5}", "launcher.num_proc: must be an integer from 1 to 65536, got 2.5"),
    ("launcher: {num_proc: true}", "launcher.num_proc: must be an integer from 1 to 65536, got true"),
    ("launcher: {num_proc: null}", "launcher.num_proc: must be an integer from 1 to 65536, got null"),
    ("train: {batch_size: four}", "train.batch_size: must be an integer from 1 to 65536, got 'four'"),
    ("launcher: {ssh_port: 70000}", "launcher.ssh_port: must be an integer from 1 to 65535, got 70000"),
    ("model: {momentum: 1.0}", "model.momentum: must be a number in (0, 1), got 1"),
    ("model: {momentum: 0}", "model.momentum: must be a number in (0, 1), got 0"),
    ("train: {momentum: 1}", "train.momentum: must be a number in [0, 1), got 1"),
    ("train: {learning_rate: 0}", "train.learning_rate: must be a number > 0, got 0"),
    ("train: {learning_rate: fast}", "train.learning_rate: must be a number > 0, got 'fast'"),
    ("train: {warmup_epochs: -0.5}", "train.warmup_epochs: must be a number >= 0, got -0.5"),
    ("train: {learning_rate: .nan}", "train.learning_rate: must be a number > 0, got nan"),
    ("data: {height: 4}", "data.height: must be an integer from 8 to 65536, got 4"),
    ("data: {height: 1000000000}", "data.height: must be an integer from 8 to 65536, got 1000000000"),
    ("train: {epochs: 1000000000000000000000000000000}",
     "train.epochs: must be an integer from 1 to 1000000, got 1000000000000000000000000000000"),
    ("train: {epochs: 1e30}", "train.epochs: must be an integer from 1 to 1000000, got '1e30'"),
    ("launcher: {num_proc: 100000000000000000000}",
     "launcher.num_proc: must be an integer from 1 to 65536, got 100000000000000000000"),
    ("train: {seed: -1}", "train.seed: must be an integer from 0 to 4294967295, got -1"),
    ("run: {resume: maybe}", "run.resume: must be true or false, got 'maybe'"),
    ("run: {dir: ''}", "run.dir: must be a non-empty string, got ''"),
    ("model: {bn: synk}", "model.bn: must be one of sync, local, none; got 'synk' (did you mean sync?)"),
    ("train: {optimizer: lamb}", "train.optimizer: must be one of sgd, adam; got 'lamb'"),
    ("launcher: {backend: slurm}", "launcher.backend: must be one of horovodrun, mpirun; got 'slurm'"),
    ("launcher: {hosts: node1}", "launcher.hosts: entry 'node1' must be host:slots with slots >= 1, e.g. node1:8"),
    ("launcher: {hosts: 'a:0'}", "launcher.hosts: entry 'a:0' must be host:slots with slots >= 1, e.g. node1:8"),
    ("launcher: {hosts: 'a:2,a:2'}", "launcher.hosts: lists host 'a' twice"),
    ("launcher: {hosts: 5}", "launcher.hosts: must be host:slots entries such as \"node1:8,node2:8\", got 5"),
    ("launcher: {env: [A]}", "launcher.env: must be a mapping of NAME: value, got a list"),
    ("launcher: {env: {A: true}}",
     "launcher.env: value of A must be a string or a number, got true (quote it: 'true')"),
    ("launcher: {env: {A-B: x}}", "launcher.env: 'A-B' is not a valid environment variable name"),
    ("launcher: {extra_args: --tcp}", "launcher.extra_args: must be a list of strings, got '--tcp'"),
    ("launcher: {extra_args: [{a: 1}]}",
     "launcher.extra_args: must be a list of strings; item a mapping is not a string"),
    ("launcher: {network_interfaces: [eth0, '']}", "launcher.network_interfaces: must be a list of strings or a "
                                                   "comma-separated string; it has an empty item"),
    ("horovod: {fusion_threshold_mb: -1}", "horovod.fusion_threshold_mb: must be an integer >= 0, got -1"),
    ("horovod: {cycle_time_ms: 0}", "horovod.cycle_time_ms: must be a number > 0, got 0"),
])
def test_type_range_and_enum_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {expected}"


@pytest.mark.parametrize("hosts", ["a;reboot:2", "$(reboot):2", "`id`:2", "-oProxyCommand=x:2", "a.b..c:2",
                                   "node1:2,b&c:2", "x-:2", "a/b:2"])
def test_host_names_are_checked(tmp_path, hosts):
    message = error_of(write(tmp_path, ""), [f"launcher.hosts={json.dumps(hosts)}"])
    assert message.startswith("command line: launcher.hosts: entry ") and "is not a host name or IPv4" in message


@pytest.mark.parametrize("hosts", ["node1:2", "gpu-node01.cluster.example:8", "10.0.0.7:4", "n_1:1,N2:1"])
def test_ordinary_host_names_pass(tmp_path, hosts):
    assert load_config(write(tmp_path, ""), [f"launcher.hosts={hosts}"])["launcher"]["hosts"] == hosts


@pytest.mark.parametrize("text, expected", [
    ("launcher: {backend: mpirun, controller: gloo}",
     "launcher.controller: gloo needs launcher.backend: horovodrun; mpirun always starts Horovod's MPI "
     "controller, so set launcher.controller: mpi (or launcher.backend: horovodrun)"),
    ("launcher: {hosts: 'a:1', hostfile: hosts.txt}",
     "launcher.hostfile: set launcher.hosts or launcher.hostfile, not both"),
    ("launcher: {hosts: 'a:1,b:2', num_proc: 4}",
     "launcher.hosts: slots add up to 3 but launcher.num_proc is 4; add hosts or slots, or lower launcher.num_proc"),
    ("run: {resume: true, overwrite: true}", "run.overwrite: run.resume and run.overwrite are both true; pick one"),
    ("horovod: {autotune_log_file: a.csv}", "horovod.autotune_log_file: is only written with horovod.autotune: true"),
    ("horovod: {stall_check: false, stall_check_shutdown_time_seconds: 60}",
     "horovod.stall_check: horovod.stall_check_shutdown_time_seconds has no effect with the stall check off; "
     "drop one of the two"),
])
def test_rules_between_keys(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {expected}"


def test_rule_broken_by_an_override_points_at_the_command_line(tmp_path):
    path = write(tmp_path, "launcher: {hosts: 'a:2'}")
    assert error_of(path, ["launcher.num_proc=3"]).startswith("command line: launcher.hosts: slots add up to 2")


def test_mpirun_with_mpi_controller_is_fine(tmp_path):
    config = load_config(write(tmp_path, "launcher: {backend: mpirun, controller: mpi}"))
    assert config["launcher"]["backend"] == "mpirun"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
