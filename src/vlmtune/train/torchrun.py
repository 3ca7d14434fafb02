"""`python -m vlmtune.train.torchrun ARGS`: torchrun, as `vlmtune train --num-gpus N` starts it, without torchrun's
own Python traceback when a worker fails.

A worker that stops on a user error has printed its one-paragraph message (marked with its rank) and exited 2; torchrun
would then raise `ChildFailedError` and print a traceback of its agent and a failure table on top of it. Here the
failure is one line instead (the first failing rank and its exit code), and the exit status is non-zero as before.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def _run() -> int:
    try:
        main()
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"torchrun: rank {rank} exited with code {failure.exitcode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_run())
