"""Whether the served model leaves the values it hands out as they were.

The server ends a trace job's forward once no lane waits for a value
(``Tracer._ends_when_served``): what runs after would be seen by no one.  That holds
only if nothing after changes, in place, a tensor a lane was already handed: some
models do (Falcon with ``parallel_attn``: ``mlp_output += attention_output``; a
``ReLU(inplace=True)`` changes its input), and a local trace then saves the changed
tensor.  So before a model's first server trace, one forward of a few tokens with a
hook on every module notes each input and output tensor's version counter when the
module is called and returns; if any changed by the end, the model's traces always
run their whole forward.  The answer is kept on the model (``_iv_outputs_stable``).
The same forward learns the module order (a trace that learns it runs whole: a pass
cut short would leave it unlearned, and every later trace would learn it again).
"""

from __future__ import annotations

from typing import Any

import torch

KEY = "_iv_outputs_stable"


def _tensors(value: Any, into: list, depth: int = 0) -> None:
    if isinstance(value, torch.Tensor):
        into.append((value, value._version))
    elif depth < 4 and isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, into, depth + 1)
    elif depth < 4 and isinstance(value, dict):  # ModelOutput is a dict too
        for v in value.values():
            _tensors(v, into, depth + 1)


def outputs_stable(root) -> bool:
    """True when a probe forward changed no module's input or output after the module
    was called or returned (kept on ``root``; False if the probe cannot run)."""
    known = root.__dict__.get(KEY)
    if known is not None:
        return known
    module = root._module
    seen: list = []

    def pre(mod, args, kwargs):
        _tensors(args, seen)
        _tensors(kwargs, seen)

    def post(mod, args, kwargs, out):
        _tensors(out, seen)

    from ..tracer import _remove_handles, _settle_order

    handles = []
    stable = ran = False
    learning = None if root._order_complete else root._learn_order()
    try:
        for mod in module.modules():
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
        vocab = getattr(getattr(module, "config", None), "vocab_size", None) or 2
        param = next(module.parameters(), None)
        ids = torch.arange(1, 5, device=param.device if param is not None else None)[None] % vocab
        with torch.no_grad():
            module(ids)
        ran = True
        stable = all(t._version == v for t, v in seen)
    except Exception:  # noqa: BLE001 - a model the probe cannot run: never end early
        stable = False
    finally:
        for h in handles:
            h.remove()
        seen.clear()
        if learning is not None:
            _remove_handles(learning)
            _settle_order(root, ran)
    root.__dict__[KEY] = stable
    return stable
