"""Replace an output folder by a freshly built one, so that the old or the new output always exists.

A command builds its output in a staging sibling, `.NAME.tmp-PID`, and calls swap_into_place at the
end. Where the file system can (Linux renameat2 RENAME_EXCHANGE), the two folders trade places in one
step and the staging folder, now holding the old output, is removed. Elsewhere the old output is moved
to `.NAME.old-PID` first: a kill between that rename and the next leaves no NAME, but the old output
is whole in `.NAME.old-PID`. The next run calls recover(), which puts it back and removes every
leftover of a process that is no longer running. .gitignore ignores both patterns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

STAGING, OLD = "tmp", "old"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def staging_dir(out_dir: Path) -> Path:
    """A fresh, empty `.NAME.tmp-PID` beside out_dir."""
    tmp = _sibling(out_dir, STAGING, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Make tmp out_dir; the old out_dir (if any) is removed once the new one is in place."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if _exchange(tmp, out_dir):  # one atomic step: out_dir is the new output, tmp holds the old
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _sibling(out_dir, OLD, os.getpid())
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out_dir, old)  # until the next rename, the output is whole in `old`; recover() restores it
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def leftovers(out_dir: Path) -> list[Path]:
    """The staging and old folders of out_dir left by processes that are no longer running, oldest first."""
    found = []
    prefix = f".{out_dir.name}."
    if not out_dir.parent.is_dir():
        return found
    for path in out_dir.parent.iterdir():
        kind, _, pid = path.name.removeprefix(prefix).partition("-")
        if path.name.startswith(prefix) and kind in (STAGING, OLD) and pid.isdigit() and not _running(int(pid)):
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover(out_dir: Path) -> list[str]:
    """Finish what an interrupted swap left: restore a lost out_dir, remove leftovers; returns what was done."""
    done = []
    stale = leftovers(out_dir)
    old = [p for p in stale if p.name.startswith(f".{out_dir.name}.{OLD}-")]
    if not out_dir.exists() and old:
        os.rename(old[-1], out_dir)
        stale.remove(old[-1])
        done.append(f"restored {out_dir} from {old[-1].name}, left by an interrupted run")
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted run")
    return done


def _sibling(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{pid}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not inside a swap while it looks for leftovers
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as someone else's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # the C library this process already uses
    except (OSError, AttributeError):  # a C library without renameat2 (glibc before 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):  # not supported here
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")
