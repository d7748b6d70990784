"""SIGTERM as an interrupt: schedulers (SLURM, Kubernetes, ``timeout``) stop jobs with SIGTERM, and a
stopped job must keep its progress exactly as Ctrl-C does.

``sigterm_interrupts()`` installs a handler that raises ``Terminated`` (a ``KeyboardInterrupt``), so
every ``finally`` / ``except KeyboardInterrupt`` that saves partial results on Ctrl-C also runs on
SIGTERM. Only the first SIGTERM raises: the ones that follow (a scheduler may repeat the signal
before its SIGKILL) are ignored, so they cannot interrupt the save that the first one started.
The CLI installs it on every process, every torchrun rank included, and exits with 143 (128 + 15).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a job stopped by SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # later SIGTERMs must not interrupt the save
    raise Terminated("terminated by SIGTERM")


def sigterm_interrupts() -> bool:
    """Make SIGTERM raise ``Terminated`` in the main thread; returns False where that is impossible
    (called from another thread, where Python cannot install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True
