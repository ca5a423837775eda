"""Helpers shared by the test files (imported as ``support``: pytest puts tests/ on
the path)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from runtime import NNsight


def assert_no_hooks(module, keep_forward=()) -> None:
    """No forward, forward-pre or backward hook on ``module`` or any submodule, and no
    wrapped ``forward`` (an instance attribute) left, except on the modules in
    ``keep_forward`` (which had their own before)."""
    if isinstance(module, NNsight):
        module = module._module
    for name, sub in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                     "_forward_hooks_with_kwargs"):
            hooks = getattr(sub, attr, {})
            assert len(hooks) == 0, f"{attr} left on {name or '<root>'}: {dict(hooks)}"
        if not any(sub is k for k in keep_forward):
            assert "forward" not in sub.__dict__, f"a wrapped forward left on {name or '<root>'}"


def x_input(seed: int = 1, batch: int = 3, hidden: int = 8) -> torch.Tensor:
    """A fixed input for the tiny MLPs."""
    return torch.randn(batch, hidden, generator=torch.Generator().manual_seed(seed))


SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def load_sample(name: str):
    """Import ``samples/<name>.py`` once (its ``main()`` is not run), with samples/ on
    the path as when it runs as a script (the samples share ``figures.py``)."""
    import importlib.util
    import sys

    if str(SAMPLES) not in sys.path:
        sys.path.append(str(SAMPLES))
    path = SAMPLES / f"{name}.py"
    module_name = f"_intervene_sample_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def line_in(path: Path, marker: str) -> int:
    """The line of ``path`` ending with ``marker`` (exactly once)."""
    lines = [i for i, text in enumerate(path.read_text().splitlines(), 1)
             if text.rstrip().endswith(marker)]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


@contextlib.contextmanager
def forward_hooks(out=None, pre=None):
    """Plain forward hooks ``out={module: fn(m, args, output)}`` and pre-hooks
    ``pre={module: fn(m, args, kwargs)}`` for the body of the ``with``, removed after."""
    handles = []
    try:
        for module, fn in (out or {}).items():
            handles.append(module.register_forward_hook(fn))
        for module, fn in (pre or {}).items():
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()



def layer_outputs(net, x) -> list:
    """Each of ``net.layers``' outputs for ``net(x)`` (a tiny MLP), by plain PyTorch hooks."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for layer in net.layers]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


class SharedLinear(torch.nn.Module):
    """One Linear applied ``calls`` times in one forward (a recurrent / weight-shared
    block), then a head."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.lin = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for _ in range(self.calls):
            x = torch.tanh(self.lin(x))
        return self.head(x)


def seeded(cls, *args):
    """``cls(*args)`` built under seed 0 (the global generator given back after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(*args)


def lin_calls(net, x, edit=None):
    """Plain hooks: every call's (input, output) of ``net.lin`` (a ``SharedLinear``: all
    ``net.calls`` of them) and the model's output, without grad; ``edit(i, output)`` may
    replace call i's output (None: keep it)."""
    seen = []

    def hook(mod, args, out):
        new = edit(len(seen), out) if edit is not None else None
        seen.append((args[0], out if new is None else new))
        return new

    h = net.lin.register_forward_hook(hook)
    try:
        with torch.no_grad():
            y = net(x)
    finally:
        h.remove()
    assert len(seen) == net.calls
    return seen, y


def tiny_bert():
    """A tiny BertModel (2 layers, hidden 32, vocabulary 100) built under seed 0, in eval
    mode: a model with a child named ``output``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, type_vocab_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(config).eval()
