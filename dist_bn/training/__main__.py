"""`python -m dist_bn.training CONFIG.yaml [key.path=value ...]`: the training job.

Run it on every rank (the launcher does: `dist-bn-launch CONFIG.yaml`), or
as a single process. Exit codes: 0 done, 2 the config or run.dir cannot be
used (one line `dist_bn.training: error: ...`, printed by rank 0 only),
1 anything else (with a traceback).
"""
from __future__ import annotations

import os
import sys

PROG = "dist_bn.training"
USAGE = f"usage: python -m {PROG} CONFIG.yaml [key.path=value ...]"


def launcher_rank() -> int:
    """This process's rank as the launcher set it, before Horovod starts (0 if none)."""
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


def error(message: str) -> int:
    if launcher_rank() == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1], file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    # The config is checked before Horovod starts and anything is built.
    from launch.config import ConfigError, load_config
    try:
        config = load_config(args[0], args[1:])
    except ConfigError as err:
        return error(str(err))

    from dist_bn.training.checkpoint import ResumeError
    from dist_bn.training.loop import SetupError, run
    try:
        run(config)
    except (SetupError, ResumeError) as err:
        return error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
