"""DataLoader workers that die with their parent, whatever kills it.

A decoding worker blocks SIGTERM/SIGINT handling of its own and is not told when its parent dies of
SIGKILL, so after ``kill -9`` (or an OOM kill) of an eval or a labeling job, its workers stayed alive,
orphaned, holding their memory. On Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill a
worker as soon as its parent thread exits; elsewhere (macOS, Windows) the init function does nothing
beyond the parent check. Under the ``forkserver`` start method the kernel's parent is the fork server,
which itself exits when the loader's owner dies, so the worker still follows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with(parent_pid: int, worker_id: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a DataLoader worker")
    try:  # the parent may have died before the line above took effect
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    # A scheduler signals the whole process group: the SIGTERM is the owner's to handle (it saves and
    # exits, shutting its loader's workers down). A worker killed by it first would make the owner's
    # DataLoader report "worker killed by signal" with a traceback while the owner is saving.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_parent() -> Callable[[int], None]:
    """A ``worker_init_fn`` for ``torch.utils.data.DataLoader``: the worker is killed when the process
    that calls this function (the loader's owner) dies."""
    return functools.partial(_die_with, os.getpid())
