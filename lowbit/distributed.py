"""Calibration shared by torch.distributed ranks (`torchrun --nproc-per-node K -m lowbit ...`).

Each rank runs its own contiguous share of the calibration batches through the layers; the
statistics are merged with collectives (ranges by MAX; Hessian sums, token counts and error
sums by SUM: stats.py keeps raw sums for this); every rank then derives the same quantized
weights from the same merged statistics, and only rank 0 writes and prints.

Every function here is a no-op (one process, world of one) unless torch.distributed is
initialised, so the pipeline calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import LowbitError

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


@contextlib.contextmanager
def from_env() -> Iterator[None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) for the
    duration of a block, unless the caller already did; NCCL when every local rank has a GPU,
    gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    # NCCL needs a GPU of its own per local rank; otherwise gloo (the pipeline computes on CPU,
    # so only the collectives would move to the GPU)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nccl = dist.is_nccl_available() and torch.cuda.is_available() and torch.cuda.device_count() >= local
    if nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if nccl else "gloo"
    try:
        # a long timeout: ranks wait for each other at every layer, and a layer of a big model
        # can take many minutes on CPU (GPTQ), longer than the default 10
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    except (ValueError, RuntimeError) as e:
        raise LowbitError(f"cannot join the torchrun process group: {str(e).splitlines()[0]}") from None
    try:
        yield
        # leave together: a gloo rank torn down while a peer still finishes its work (rank 0
        # writing the checkpoint) can abort at exit (SIGABRT, seen in CI-like runs); skipped when
        # the block raised, where a barrier would wait for ranks that may never come
        dist.barrier()
    finally:
        dist.destroy_process_group()


def share(items: Sequence[T]) -> tuple[list[T], int]:
    """This rank's contiguous share of `items` and the index of its first item.

    Contiguous, in rank order, so that concatenating the shares (gather) gives back the
    single-process order. Ranks differ by at most one item.
    """
    n, k, r = len(items), world(), rank()
    if n < k:
        raise LowbitError(f"{n} calibration batch(es) cannot be shared by {k} ranks; use more "
                          "--samples or fewer processes")
    start, end = r * n // k, (r + 1) * n // k
    return list(items[start:end]), start


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    buf = t.to(_device()).contiguous()
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (exact in any order)."""
    return _reduce(t, dist.ReduceOp.MAX) if active() else t


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks. Floating-point sums depend on their order, so a sum over
    ranks can differ from one process's running sum in the last bits."""
    return _reduce(t, dist.ReduceOp.SUM) if active() else t


def sum_floats(values: list[float]) -> list[float]:
    """Python floats summed over ranks (in float64)."""
    if not active():
        return values
    return reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def sum_int(value: int) -> int:
    return int(reduce_sum(torch.tensor([value], dtype=torch.int64)).item()) if active() else value


def gather_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """The first `limit` rows of every rank's `x` [rows, features] concatenated in rank order,
    truncated to `limit`: with contiguous shares, the rows one process would have kept."""
    if not active():
        return x[:limit]
    x, dev = x[:limit], _device()
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=dev))
    most = int(max(c.item() for c in counts))
    padded = torch.zeros(most, *x.shape[1:], dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)  # all_gather wants equal shapes: pad, then trim
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])[:limit].to(x.device)


def merge_absmax(a) -> None:
    """An AbsMax (stats.py) over every rank's tokens."""
    if active():
        a.value, a.count = reduce_max(a.value), sum_int(a.count)


def merge_hessian(h) -> None:
    """A Hessian (stats.py) over every rank's tokens: sums of x^T x and token counts add."""
    if active():
        h.sum, h.count = reduce_sum(h.sum), sum_int(h.count)


class Discard:
    """The writer of ranks other than 0: they compute what rank 0 writes, and keep nothing."""

    layers_done = 0  # distributed runs do not resume
    resumed_report: list = []

    def __enter__(self) -> "Discard":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name):  # add, add_linear, skip_linear, end_layer, ...: all no-ops
        return lambda *args, **kwargs: None
