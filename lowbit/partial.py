"""A resumable output directory: OUT is built in `.{name}.partial` beside it, and a manifest
records, atomically and after the data it names is on disk, what is finished and which run
it belongs to. A run killed at any moment (kill -9 included) leaves the directory and its last
manifest; a rerun with the same fingerprint continues from there, one with another refuses
to mix the two. On success the manifest goes and the directory is renamed to OUT."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LowbitError
from .outdir import check_output, replace_dir, writing

log = logging.getLogger(__name__)

MANIFEST = "lowbit-partial.json"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_fingerprint(path: Path) -> dict:
    """What identifies an input checkpoint without reading its weights: config.json's bytes
    and every other file's name, size and modification time."""
    files = {}
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    config = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return {"path": str(path.resolve()), "config_sha256": config, "files": files}


def software_fingerprint() -> str:
    """lowbit's own source plus the versions of the libraries that compute the numbers: a
    resumed run must compute exactly what the first one did."""
    from importlib.metadata import version  # importing compressed-tensors itself takes ~2 s

    import safetensors
    import torch
    import transformers

    digest = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return (f"lowbit-src {digest.hexdigest()[:16]} torch {torch.__version__} transformers "
            f"{transformers.__version__} compressed-tensors {version('compressed-tensors')} "
            f"safetensors {safetensors.__version__}")


class Partial:
    """The open work directory and its manifest state (a JSON-able dict)."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state

    def commit(self, state: dict) -> None:
        """Record `state` atomically; call only after the files it names were fsynced."""
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        fsync_path(tmp)
        os.replace(tmp, self.path / MANIFEST)
        fsync_path(self.path)
        self.state = state


def _differs(old: dict, new: dict) -> str | None:
    for key in new:
        if old.get(key) != new[key]:
            return key
    return None


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LowbitError(f"another lowbit run is writing {path}; wait for it or stop it") from None
    return fd


def _open(out: Path, work: Path, fingerprint: dict, overwrite: bool) -> tuple[int, dict]:
    """Lock the work directory and return its state: resumed when the fingerprint matches,
    fresh otherwise (refused without --overwrite when it holds another run's layers)."""
    work.mkdir(exist_ok=True)
    fd = _lock(work)
    try:
        try:
            state = json.loads((work / MANIFEST).read_text())
        except (OSError, ValueError):  # none (killed before the first commit), or not ours
            state = None
        if state is not None and state.get("fingerprint") != fingerprint:
            what = _differs(state.get("fingerprint", {}), fingerprint) or "setup"
            if not overwrite and state.get("layers_done", 0) > 0:
                raise LowbitError(
                    f"{work} holds a partial run of {out} with a different {what}; rerun with the "
                    "same arguments to resume it, or pass --overwrite to discard it and start over")
            state = None
        if state is None:
            if any(work.iterdir()):
                log.warning("discarding the unfinished %s and starting over", work)
            for f in work.iterdir():
                shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
            state = {"fingerprint": fingerprint, "layers_done": 0}
            Partial(work, state).commit(state)
        return fd, state
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def partial_dir(out: str | os.PathLike, fingerprint: dict, overwrite: bool = False,
                keep=lambda exc, state: False) -> Iterator[Partial]:
    """Yield OUT's work directory (resumed or fresh) to fill; on success it replaces OUT.

    On failure the directory is removed unless `keep(exc, state)` says a rerun can continue
    it (an interruption, a full disk, after some layers were committed).
    """
    out = check_output(out, overwrite)
    work = out.with_name(f".{out.name}.partial")
    with writing(out):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        fd, state = _open(out, work, fingerprint, overwrite)
    partial = Partial(work, state)
    try:
        try:
            yield partial
            with writing(out):
                (work / MANIFEST).unlink()
                replace_dir(work, out)
        except BaseException as e:
            if not keep(e, partial.state):
                shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        os.close(fd)
