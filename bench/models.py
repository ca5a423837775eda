"""The models the cases run on: intervene and plain hooks share one, nnsight gets a copy.

nnsight wraps the modules it is given (it sets a ``forward`` attribute on every
submodule), which slows any later plain forward of those modules, so nnsight
runs its own copy of the same seeded weights.  intervene leaves nothing on a
module between traces (what it attaches is removed when a trace ends), so it shares
the plain-hooks model: the key comparison then runs on the very same tensors
in memory.  ``residue`` checks that promise after the runs.  Weights are frozen
(``requires_grad_(False)``), as in inference: no autograd graph on any side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:  # the bench extra (`make bench` installs it); without it nnsight's column is empty
    from . import theirs
except ImportError:
    theirs = None  # type: ignore[assignment]

NNSIGHT_MISSING = "nnsight is not installed (`make bench` installs the bench extra)"
SEED = 0


class MLP(nn.Module):
    """``n_layers`` Linear(hidden, hidden) layers, each followed by ReLU."""

    def __init__(self, n_layers: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def mlp(n_layers: int, hidden: int, seed: int = SEED) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MLP(n_layers, hidden)
    return net.eval().requires_grad_(False)


def inputs(rows: int, hidden: int, seed: int = SEED + 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden, generator=gen)


@dataclass
class Trio:
    """The network for each side: ``plain`` bare, ``ours`` the same module wrapped by
    intervene, ``nnsight`` a copy wrapped by nnsight (``None`` when unavailable)."""

    ours: Any
    plain: nn.Module
    nnsight: Any
    ours_error: str | None = None
    nnsight_error: str | None = None


def mlp_trio(n_layers: int, hidden: int) -> Trio:
    from runtime import NNsight

    base = mlp(n_layers, hidden)
    nns = theirs.Batched(copy.deepcopy(base)) if theirs is not None else None
    return Trio(ours=NNsight(base), plain=base, nnsight=nns,
                nnsight_error=None if theirs is not None else NNSIGHT_MISSING)


def language_trio() -> tuple[Trio, Any]:
    """The default model (smollm2-135m) three times, and its tokenizer."""
    from transformers.utils import logging as hf_logging

    from runtime.models import DEFAULT_ALIAS, load_causal_lm

    hf_logging.disable_progress_bar()
    hf, tok = load_causal_lm(DEFAULT_ALIAS)
    hf.requires_grad_(False)
    ours = nns = None
    ours_error = nnsight_error = None
    try:
        from runtime import LanguageModel

        ours = LanguageModel(hf, tokenizer=tok)
    except Exception as exc:  # noqa: BLE001 - reported as "not supported yet"
        ours_error = f"{type(exc).__name__}: {exc}"
    if theirs is None:
        nnsight_error = NNSIGHT_MISSING
    else:
        try:
            nns = theirs.language_model(copy.deepcopy(hf), tok)
        except Exception as exc:  # noqa: BLE001
            nnsight_error = f"{type(exc).__name__}: {exc}"
    return Trio(ours, hf, nns, ours_error, nnsight_error), tok


def residue(net: nn.Module) -> list[str]:
    """Hooks or patched ``forward`` attributes left on ``net``'s modules."""
    found = []
    for name, mod in net.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or "forward" in mod.__dict__:
            found.append(name or "<root>")
    return found
