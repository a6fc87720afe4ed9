"""`python -m lora_trainer.launch [torchrun options] -m lora_trainer ...`: torchrun that keeps
the trainer's exit code.

torch.distributed.run exits 1 whatever its workers exited with. A trial Job's
podFailurePolicy fails the trial at once on the trainer's exit codes for bad configuration,
bad data and out of GPU memory (retrying cannot help them); behind plain torchrun those codes
would read as 1 and be retried.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def worker_exit_code(codes: Sequence[int]) -> int:
    """The code the launcher exits with: the first worker's that exited by itself, else the
    first killed one's as a shell reports it (signal N reads 128 + N).

    When one worker fails, torchrun SIGTERMs the others; a lower rank killed that way is a
    consequence, and its 143 would hide the failing worker's code.
    """
    exited = [code for code in codes if code > 0]
    killed = [128 - code for code in codes if code < 0]
    return (exited + killed + [1])[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as error:
        ranks = sorted(error.failures)
        return worker_exit_code([error.failures[rank].exitcode for rank in ranks])
    except SignalException as stop:
        # SIGTERM (a stopped or evicted trial): the workers were stopped too, as the trainer is.
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
