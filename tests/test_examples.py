"""examples/ run as documented and show what they claim."""
import re

import pytest

from mpirun_helpers import mpirun_argv, run_ranks
from paths import REPO


@pytest.mark.mpirun
def test_global_vs_local_statistics_example():
    result = run_ranks(mpirun_argv(2, str(REPO / "examples" / "global_vs_local_statistics.py")))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for rank in range(2):
        block = lines[lines.index(next(l for l in lines if l.startswith(f"rank {rank}/2"))):][:4]
        sync = re.search(r"sync\s+BN mean (.*)", block[2]).group(1)
        truth = re.search(r"global truth\s+(.*)", block[3]).group(1)
        local = re.search(r"local\s+BN mean (.*)", block[1]).group(1)
        assert sync == truth and local != truth
