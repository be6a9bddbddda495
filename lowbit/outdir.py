"""Output directories appear whole or not at all: write a temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out`.

    On any failure the temporary directory is removed and `out` is left untouched, so a
    crash never leaves a half-written directory that looks like a valid checkpoint.
    """
    out = check_output(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # rename the old one away first so there is never a moment with neither
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
