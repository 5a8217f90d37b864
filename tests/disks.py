"""Real small disks for fault tests: a tmpfs that fills up (root only)."""
import contextlib
import subprocess

import pytest


@contextlib.contextmanager
def small_tmpfs(mount_point, size):
    """Mount a tmpfs of `size` (e.g. "48k") at the directory `mount_point`, or
    skip the test where mounting is not allowed; unmounted afterwards."""
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
