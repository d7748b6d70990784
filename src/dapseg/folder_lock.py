"""One job at a time in a folder (an eval work dir, a labeling out dir), across processes and hosts.

Two runs writing one folder would both compute every image and overwrite each other's tables. The
lock is ``filelock``'s (``flock`` on POSIX: released by the kernel when its holder dies, so a killed
job never leaves a stale lock; a run that ends removes both files). The second run does not wait: it
stops at once with a message naming the holder (host, pid, command, start time), read from a small
JSON file written beside the lock. That file is informational only and untrusted: it is shown, never acted on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from dapseg.files import atomic_write_text

LOCK_NAME = ".dapseg.lock"
HOLDER_NAME = ".dapseg.lock.json"


class FolderBusyError(RuntimeError):
    """Another dapseg run holds the folder."""


def describe_holder(folder: Path) -> str:
    """What the holder file says, as one line (or a note that it cannot be read)."""
    try:
        text = (folder / HOLDER_NAME).read_text(encoding="utf-8")[:4096]
        try:
            info = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(info, dict):
            raise ValueError("not an object")
        fields = {k: str(info.get(k, "?"))[:200] for k in ("host", "pid", "command", "started")}
        return f"pid {fields['pid']} on {fields['host']}, started {fields['started']}: {fields['command']}"
    except (OSError, ValueError) as e:
        return f"holder unknown ({folder / HOLDER_NAME}: {e})"


@contextmanager
def hold_folder(folder: str | os.PathLike[str], what: str = "folder") -> Iterator[None]:
    """Hold ``folder``'s lock for the block (the folder is created); raise ``FolderBusyError`` naming
    the holder when another run has it. ``what`` names the folder in the message ("work dir")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(f"{what} {folder} is in use by another dapseg run ({describe_holder(folder)}); "
                              f"wait for it to finish or choose another {what}") from None
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:1000],
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        atomic_write_text(folder / HOLDER_NAME, json.dumps(holder))
        yield
    finally:
        # The lock files do not outlive the run: removed while still held, so no other run can have
        # taken them (a run that opened the lock file just before sees an unlinked file once it gets
        # the flock, which filelock treats as not acquired: it reports the folder busy, never shares it).
        for name in (HOLDER_NAME, LOCK_NAME):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        lock.release()
