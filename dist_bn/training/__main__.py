"""`python -m dist_bn.training CONFIG.yaml [key.path=value ...]`: the training job.

Run it on every rank (the launcher does: `dist-bn-launch CONFIG.yaml`), or
as a single process. Exit codes: 0 done, 2 the config, run.dir or its
checkpoints cannot be used, 1 the run could not write its files (a full
disk: checkpoint, train.log, TensorBoard or metrics.json), each with one
line `dist_bn.training: error: ...` printed by rank 0 only; 1 anything else
(with a traceback).
"""
from __future__ import annotations

import sys

from dist_bn import rank_env

PROG = "dist_bn.training"
USAGE = f"usage: python -m {PROG} CONFIG.yaml [key.path=value ...]"


USAGE_ERROR = 2
WRITE_ERROR = 1


def error(message: str, code: int = USAGE_ERROR) -> int:
    """Print `message` as the job's one error line (rank 0) and return `code`,
    which every rank also records for the launcher (see `supervision`)."""
    from dist_bn.config import printable
    from dist_bn.training.supervision import record_exit_status
    rank = rank_env.launcher_rank()
    if rank == 0:
        print(f"{PROG}: error: {printable(message)}", file=sys.stderr, flush=True)
    record_exit_status(rank, code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1], file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    from dist_bn.training.supervision import stop_with_launcher
    stop_with_launcher()  # a rank must not outlive a killed dist-bn-launch
    # The config is checked before Horovod starts and anything is built.
    from dist_bn.config import ConfigError
    from dist_bn.training.schema import load_config
    try:
        config = load_config(args[0], args[1:])
    except ConfigError as err:
        return error(str(err))

    from dist_bn.training.checkpoint import CheckpointError, ResumeError
    from dist_bn.training.loop import SetupError, run
    from dist_bn.training.report import ReportError
    try:
        run(config)
    except (SetupError, ResumeError) as err:
        return error(str(err))
    except (CheckpointError, ReportError) as err:
        return error(str(err), WRITE_ERROR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
