"""The one progress helper: tqdm on stderr, silent when not a terminal unless forced."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap an iterable in a progress bar written to stderr.

    Bars are shown on a terminal, hidden in pipes and CI logs (LOWBIT_PROGRESS=1 forces them),
    and only by rank 0 of a distributed run.
    """
    from .distributed import is_main  # ranks other than 0 stay quiet

    show = (sys.stderr.isatty() or os.environ.get("LOWBIT_PROGRESS") == "1") and is_main()
    return tqdm(items, desc=desc, total=total, disable=not show, leave=False, file=sys.stderr)
