"""Shared fixtures: the default language model (loaded once per session) and tiny models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from runtime.models import DEFAULT_ALIAS, load_causal_lm, tiny_llama


@pytest.fixture(scope="session")
def default_lm() -> tuple[Any, Any]:
    """(model, tokenizer) for the default alias; fetched and converted on first use.

    Tests using this fixture should be marked ``@pytest.mark.slow``.
    """
    return load_causal_lm(DEFAULT_ALIAS)


@pytest.fixture
def tiny_lm() -> Any:
    """A fresh, seed-0 tiny Llama (cheap to build, so not shared between tests)."""
    return tiny_llama(0)


@pytest.fixture
def keep_grad_mode():
    """Give back the grad mode a test found (the samples switch autograd off for
    themselves)."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def pytest_collection_modifyitems(config, items):
    """``arch_all`` tests (the full architecture matrix) run only when asked for by a
    marker expression naming them (``pytest -m arch_all``, ``make test-arch``)."""
    if "arch_all" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("arch_all") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if item.get_closest_marker("arch_all") is not None]
        )
        items[:] = kept
