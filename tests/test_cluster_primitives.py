"""The building blocks of cluster-safe runs: SIGTERM as an interrupt, workers that die with their
parent, one run per folder, paths confined to a folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dapseg.files import resolve_inside
from dapseg.folder_lock import FolderBusyError, hold_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has exited all the same
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


# --- resolve_inside ---------------------------------------------------------------------------

def test_resolve_inside_accepts_names_below_the_root(tmp_path):
    assert resolve_inside(tmp_path, "a/b.png", what="x") == (tmp_path / "a" / "b.png").resolve()


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.png", "a/../../x.png", "", "a\x00b"])
def test_resolve_inside_refuses_escapes_naming_the_source(tmp_path, name):
    with pytest.raises(ValueError, match=r"line 3 of val\.txt"):
        resolve_inside(tmp_path / "root", name, what="line 3 of val.txt")


def test_resolve_inside_refuses_a_symlink_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="leads outside"):
        resolve_inside(root, "link/x.png", what="name")


# --- folder lock ------------------------------------------------------------------------------

def test_a_second_run_on_a_held_folder_stops_naming_the_holder(tmp_path):
    holder = _python(f"""
        import sys, time
        from dapseg.folder_lock import hold_folder
        with hold_folder({str(tmp_path)!r}, "work dir"):
            print("held", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"work dir .* in use .*pid {holder.pid} "), \
                hold_folder(tmp_path, "work dir"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold_folder(tmp_path, "work dir"):  # the kernel released the dead holder's lock
        pass


def test_the_lock_files_end_with_the_run_and_a_refused_run_keeps_the_holders(tmp_path):
    names = {".dapseg.lock", ".dapseg.lock.json"}
    with hold_folder(tmp_path, "out dir"):
        assert {p.name for p in tmp_path.iterdir()} == names
        with pytest.raises(FolderBusyError), hold_folder(tmp_path, "out dir"):
            pass
        assert {p.name for p in tmp_path.iterdir()} == names  # the refused run removed nothing
        with pytest.raises(FolderBusyError), hold_folder(tmp_path, "out dir"):  # still held
            pass
    assert list(tmp_path.iterdir()) == []
    with hold_folder(tmp_path, "out dir"):  # and the folder can be held again
        pass
    assert list(tmp_path.iterdir()) == []


# --- SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_runs_the_save_once_even_when_repeated(tmp_path):
    marker = tmp_path / "saved.txt"
    child = _python(f"""
        import sys, time
        from dapseg.termination import Terminated, EXIT_CODE, sigterm_interrupts
        sigterm_interrupts()
        try:
            print("ready", flush=True)
            time.sleep(60)
        except Terminated:
            time.sleep(0.5)  # a second SIGTERM arrives while saving
            open({str(marker)!r}, "a").write("saved\\n")
            sys.exit(EXIT_CODE)
    """)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 143
    assert marker.read_text() == "saved\n"


# --- DataLoader workers -----------------------------------------------------------------------

def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path):
    child = _python("""
        import os, time, torch
        from torch.utils.data import DataLoader, Dataset
        from dapseg.workers import die_with_parent

        class Slow(Dataset):
            def __len__(self): return 1000
            def __getitem__(self, i):
                # the first items come fast; then each worker is busy for long (a huge image to
                # decode), where torch's own parent check, run between items, cannot see the death
                time.sleep(0.05 if i < 4 else 30)
                return os.getpid()

        loader = DataLoader(Slow(), batch_size=None, num_workers=2, worker_init_fn=die_with_parent())
        batches = iter(loader)  # kept referenced: the workers stay up while the parent sleeps
        pids = set()
        while len(pids) < 2:
            pids.add(int(next(batches)))
        time.sleep(1)  # both workers are now inside a long item (an idle worker sees its pipe close)
        print(" ".join(map(str, sorted(pids))), flush=True)
        time.sleep(60)
    """)
    line = child.stdout.readline().split()
    workers = [int(p) for p in line]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "a DataLoader worker outlived its parent"
