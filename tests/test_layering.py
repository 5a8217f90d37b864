"""Dependencies point one way, launch -> dist_bn, and the launcher stays free of TensorFlow."""
import ast
import subprocess
import sys

import pytest

from paths import REPO


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("path", sorted((REPO / "dist_bn").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_the_launcher(path):
    assert [m for m in imported_modules(path) if m == "launch" or m.startswith("launch.")] == []


def test_the_launcher_imports_no_tensorflow():
    code = ("import sys, launch.cli, launch.runner, launch.emit; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'horovod') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_job_leaves_exactly_the_launchers_sections_alone():
    from dist_bn.training.schema import LAUNCHER_SECTIONS, SECTIONS as JOB_SECTIONS
    from launch.schema import LAUNCHER_SECTIONS as LAUNCH_SECTIONS, SECTIONS
    assert tuple(LAUNCH_SECTIONS) == LAUNCHER_SECTIONS
    assert list(SECTIONS) == [*JOB_SECTIONS, *LAUNCH_SECTIONS]


def test_the_lazy_package_exports_what_it_did_and_no_module_shadows_it():
    """Every module of the package imported first, then every public name is
    still the function or class, never a module of the same name."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts)
                     for p in (REPO / "dist_bn").rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    code = ("import importlib, types, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import dist_bn\n"
            "from dist_bn import precise_bn, SyncBatchNormalization\n"
            "assert callable(precise_bn) and not isinstance(precise_bn, types.ModuleType)\n"
            "assert all(not isinstance(getattr(dist_bn, n), types.ModuleType) for n in dist_bn.__all__)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
