"""Models whose weights load only when a local block first needs them.

``LanguageModel(name)`` reads the config and the tokenizer and builds the module
tree on the ``meta`` device (no memory, no weights read), so plans, ``scan``,
``show-plan`` checks and remote blocks work at once.  The first local block (or
plain call, or ``generate`` outside a block) calls ``materialize``: the model is
loaded as usual and its state moves into the meta tree's module objects, so
every envoy, cached path and order fact of the wrapper stays valid.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .paths import shown

# Instance attributes of a module that stay the meta module's own: its children
# (their identity is what envoys and caches hold) and any hooks on it.
_KEEP = frozenset({"_modules"})


def can_defer(source: Any, device_map: Any, from_pretrained_kwargs: dict) -> bool:
    """Only a plain load from a name or folder onto the CPU is deferred."""
    return (isinstance(source, (str, os.PathLike)) and device_map is None
            and not from_pretrained_kwargs)


def meta_causal_lm(source: Any, tokenizer: Any, dtype: Any) -> tuple[Any, Any]:
    """The model's module tree on the meta device, and its tokenizer (loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import (
        _is_local,
        _load_tokenizer,
        _location,
        _missing_model_error,
        _prepare_tokenizer,
        _resolve_dtype,
    )

    location, default_dtype = _location(source)
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = default_dtype
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=_is_local(location))
    except OSError as err:
        raise _missing_model_error(str(source), err) from err
    kwargs = {} if torch_dtype in (None, "auto") else {"dtype": torch_dtype}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if tokenizer is None:
        tokenizer = location
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    return model.eval(), _prepare_tokenizer(tokenizer)


def materialize(meta: torch.nn.Module, real: torch.nn.Module) -> None:
    """Move ``real``'s state (parameters, buffers, tensor attributes, config,
    generation config...) into ``meta``'s module objects, module by module."""
    pairs = list(zip(meta.named_modules(remove_duplicate=False),
                     real.named_modules(remove_duplicate=False)))
    for (name_m, mod_m), (name_r, mod_r) in pairs:
        if name_m != name_r or type(mod_m) is not type(mod_r):
            raise RuntimeError(
                f"the loaded model's module tree differs from its config's at `{shown(name_r)}`"
            )
    for (_, mod_m), (_, mod_r) in pairs:
        for key, value in mod_r.__dict__.items():
            if key in _KEEP or "hook" in key or key == "forward":
                continue
            mod_m.__dict__[key] = value
