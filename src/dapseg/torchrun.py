"""``python -m dapseg.torchrun``: torchrun, ending with one line instead of torch's traceback.

torchrun's elastic agent turns a SIGTERM it receives into an exception that it re-raises after
stopping the ranks, so ``torchrun`` itself exits 1 with a traceback even when every rank saved its
progress and exited 143; and where a rank exits non-zero it raises ``ChildFailedError``, printed
as a multi-page traceback. This launcher takes exactly torchrun's arguments and runs torch's own
launcher (``torch.distributed.run``), then says in one line how the job ended:

- a SIGTERM (to the launcher, or to the ranks: a scheduler usually signals them all) where every
  rank exited 143 or was stopped by the signal: "terminated (SIGTERM) ...", exit 143, as one process;
- ranks that failed: one line per rank with its exit code (each rank printed its own error), and
  the first rank's code as the launcher's.

    python -m dapseg.torchrun --nproc_per_node=8 -m dapseg segment photos/ --classes-file c.txt --out labels/
"""

from __future__ import annotations

import signal
import sys

from dapseg.termination import EXIT_CODE as TERMINATED_EXIT_CODE

_TERMINATED = {TERMINATED_EXIT_CODE, -signal.SIGTERM}  # exited 143 itself, or killed by the signal


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as e:  # the launcher got the signal; the agent has stopped every rank
        name = signal.Signals(e.sigval).name
        print(f"dapseg.torchrun: terminated ({name}); the ranks were stopped and saved their progress: "
              "run the same command to resume", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        if set(codes.values()) <= _TERMINATED:
            print(f"dapseg.torchrun: terminated (SIGTERM): every rank ({len(codes)}) saved its progress and "
                  "exited; run the same command to resume", file=sys.stderr)
            return TERMINATED_EXIT_CODE
        for rank, code in codes.items():
            print(f"dapseg.torchrun: rank {rank} exited with code {code} (its own output above says why)",
                  file=sys.stderr)
        first = next(iter(codes.values()))
        return first if 0 < first < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
