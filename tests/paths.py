"""Where things are, for tests in any sub-folder: the repository and the mpirun case scripts."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "tests" / "mpirun"  # scripts every rank runs; the tests beside the package assert
