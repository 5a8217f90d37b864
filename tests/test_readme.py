"""The README's promises that code can check: its commands and its config table."""

from launch.schema import render_markdown
from paths import REPO

README = open(REPO / "README.md", encoding="utf-8").read()


def test_readme_opens_with_the_demo_and_test_commands():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == [
        "bash scripts/demo.sh", "bash scripts/test.sh"]


def test_ci_runs_the_readme_test_command():
    ci = open(REPO / ".ci" / "run", encoding="utf-8").read()
    assert "bash scripts/test.sh" in ci


def test_config_reference_is_the_rendered_schema():
    assert render_markdown().strip() in README
