"""launch.schema: the table is complete and consistent, and the renderer covers it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import main
from launch.command import KNOBS
from launch.schema import BY_KEY, FIELDS, RULES, SECTIONS, render_markdown
from paths import REPO


TRAINING_KEYS = {
    "model": ["width", "depth", "bn", "momentum"],
    "data": ["frames", "height", "width", "num_classes", "train_clips", "eval_clips", "seed"],
    "train": ["batch_size", "epochs", "learning_rate", "warmup_epochs", "optimizer", "momentum",
              "mixed_precision", "seed", "log_every", "checkpoint_every", "precise_bn_batches"],
    "run": ["dir", "resume", "overwrite", "tensorboard"],
}


def test_training_keys_are_exactly_the_agreed_ones():
    for section, names in TRAINING_KEYS.items():
        assert [f.name for f in FIELDS if f.section == section] == names


def test_keys_are_unique_and_in_known_sections():
    assert len(BY_KEY) == len(FIELDS)
    assert {f.section for f in FIELDS} == set(SECTIONS)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.key)
def test_every_default_passes_its_own_check(field):
    assert field.check(field.default) == field.default


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.key)
def test_every_key_has_a_one_line_doc(field):
    assert field.doc and "\n" not in field.doc and field.doc.endswith(".")


def test_rules_name_real_keys():
    for rule in RULES:
        assert all(key in BY_KEY for key in rule.keys), rule


def test_every_knob_is_a_schema_key_whose_doc_names_its_flag():
    for knob in KNOBS:
        assert knob.flag in BY_KEY[knob.key].doc, knob.key


def test_markdown_covers_every_key_once():
    table = render_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [f.key for f in FIELDS]
    for row, field in zip(rows, FIELDS):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 5, row
        assert cells[1] == field.type.name and cells[4] == field.doc
    for rule in RULES:
        assert rule.doc in table


def test_markdown_header():
    assert render_markdown().startswith("| key | type | default | allowed | description |\n|---|---|---|---|---|\n")


def test_schema_option_prints_the_table(capsys):
    assert main(["--schema"]) == 0
    assert capsys.readouterr().out == render_markdown()


def test_python_dash_m_launch_schema():
    result = subprocess.run([sys.executable, "-m", "launch", "--schema"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout == render_markdown()
