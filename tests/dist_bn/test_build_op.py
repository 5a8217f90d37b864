"""The kernel's build stamp: a build is used only when it matches its source."""
from dist_bn import build_op


def test_a_build_is_stale_once_its_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "op.cc"
    source.write_text("int x;\n")
    monkeypatch.setattr(build_op, "SOURCE", source)
    monkeypatch.setattr(build_op, "LIBRARY", tmp_path / "op.so")
    monkeypatch.setattr(build_op, "STAMP", tmp_path / "op.so.stamp")
    assert not build_op.up_to_date()  # nothing built
    build_op.LIBRARY.write_bytes(b"")
    argv = ["g++", "-O2", str(source)]
    build_op.STAMP.write_text(build_op.stamp_text(argv))
    assert build_op.up_to_date() and build_op.up_to_date(argv)
    assert not build_op.up_to_date(argv + ["-g"])  # other flags: rebuilt
    source.write_text("int y;\n")
    assert not build_op.up_to_date()  # edited source: never loaded


def test_the_repository_kernel_is_built_and_current():
    # scripts/bootstrap.sh builds it; a stale one would silently cost ~120 µs per collective.
    assert build_op.up_to_date(build_op.command()), "run python -m dist_bn.build_op"
