"""Tiny test models, built from configs: :func:`tiny_llama` and :func:`tiny_mlp`.

Both are small, random and seed-deterministic (the same seed always gives the same weights,
and building one leaves the caller's random state as it was), so tests run in seconds and
compare against plain PyTorch to the bit.

Importing this module is cheap: torch and transformers are imported inside the functions
that need them, and ``TinyMLP`` is made on first access.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["tiny_llama", "tiny_mlp"]  # and TinyMLP, made on first access


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    # fork_rng restores the caller's global RNG state afterwards, so building a tiny model
    # does not perturb whatever random stream the caller relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(seed: int = 0, **config_overrides: Any) -> Any:
    """Build a small random ``LlamaForCausalLM`` (2 layers, hidden 32, vocab 128) in eval mode.

    The same ``seed`` always gives the same weights. ``config_overrides`` replace
    ``LlamaConfig`` fields. Decoder layers are ``model.model.layers[i]`` and return a tensor.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(config_overrides)
    config = LlamaConfig(**settings)
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


@functools.cache
def _tiny_mlp_class() -> type:
    import torch
    from torch import nn

    class TinyMLP(nn.Module):
        """``n_layers`` Linear(hidden, hidden) layers, each followed by ReLU, then a 2-way head."""

        def __init__(self, n_layers: int = 4, hidden: int = 8) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
            self.head = nn.Linear(hidden, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    # Present the class as runtime.tiny.TinyMLP (reachable through __getattr__ below), so
    # reprs, isinstance checks via the module attribute, and pickling all work.
    TinyMLP.__module__ = __name__
    TinyMLP.__qualname__ = "TinyMLP"
    return TinyMLP


def __getattr__(name: str) -> Any:
    # `TinyMLP` is built on first access so that importing this module never imports torch.
    if name == "TinyMLP":
        return _tiny_mlp_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_mlp(n_layers: int = 4, hidden: int = 8, seed: int = 0) -> torch.nn.Module:
    """Build a ``TinyMLP`` in eval mode; the same ``seed`` always gives the same weights."""
    with _seeded(seed):
        model = _tiny_mlp_class()(n_layers=n_layers, hidden=hidden)
    return model.eval()
