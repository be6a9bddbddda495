"""Output directories appear whole or not at all: write a temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LowbitError


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing OUT unless overwrite is given; check its parent is writable."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite to replace it")
    # only check here: directories are created when writing starts, so a run that fails its
    # input checks leaves nothing behind
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise LowbitError(f"cannot write to {ancestor}: permission denied or not a directory")
    return out


_HINTS = {
    errno.ENOSPC: "free some space or write OUT to another disk",
    errno.EDQUOT: "free some space or write OUT to another disk",
    errno.EROFS: "write OUT to a writable file system",
    errno.EACCES: "write OUT somewhere you may write",
    errno.EPERM: "write OUT somewhere you may write",
}


@contextlib.contextmanager
def writing(out: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing OUT (a full disk, a read-only file system) into a
    one-line LowbitError that says what to do. Wrap only code that writes OUT, so a failed read
    of the input is never blamed on the output."""
    try:
        yield
    except OSError as e:
        hint = _HINTS.get(e.errno, "check the output location")
        raise LowbitError(f"cannot write {out}: {e.strerror or e}; {hint}") from None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out`.

    On any failure the temporary directory is removed and `out` is left untouched, so a
    crash never leaves a half-written directory that looks like a valid checkpoint.
    """
    out = check_output(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with writing(out):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with writing(out):
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an existing `out` whole."""
    if out.exists():
        # rename the old one away first so there is never a moment with neither
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
