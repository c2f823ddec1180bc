"""Shared fixtures: where ../shared lives, and small checkpoints written by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "fixtures" / "tiny-deepseek"


@pytest.fixture(scope="module")
def lib():  # type: ignore[no-untyped-def]
    """dsmoe's native library, which must be built here (test_native_kernels has its own, that skips
    where the CPU lacks AVX2)."""
    from dsmoe.native.library import native_library, native_library_problem

    library = native_library()
    assert library is not None, f"dsmoe's native library is not in use: {native_library_problem()}"
    return library


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    if not TINY.exists():
        pytest.fail(f"the shared fixture is missing: {TINY}")
    return TINY


@pytest.fixture
def tiny_copy(tmp_path: Path, tiny_path: Path) -> Path:
    """A writable copy of the tiny checkpoint, for tests that break it."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_path, dst)
    return dst


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> None:
    """Two threads, or what ``@pytest.mark.threads(n)`` asks: many tiny matrices run faster on
    one thread, and far faster when other jobs share the two cores."""
    marker = request.node.get_closest_marker("threads")
    torch.set_num_threads(marker.args[0] if marker else 2)


@pytest.fixture(autouse=True)
def _own_model_list(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dsmoe quantize`` records its folders in $XDG_CACHE_HOME/dsmoe/models.json: never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _own_quantized_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--bits`` loads write quantized copies under $DSMOE_CACHE: a fresh one per test, never the user's."""
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.mktemp("dsmoe-cache")))
