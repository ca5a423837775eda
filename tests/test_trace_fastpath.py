"""The plain-trace fast path (a `trace` block without steps, backward blocks or a late
cache; see Tracer._plain): same values as plain hooks, and nothing of a trace is left
behind it (the model's running-trace slot, the thread's active interleaver, the tracer)."""

from __future__ import annotations

import gc
import weakref

import torch

from compiler import intervene
from runtime import NNsight, interleave
from runtime.models import tiny_mlp
from runtime.tracer import root_state


@intervene
def save_and_write(model, x):
    with model.trace(x) as tracer:
        model.layers[1].output[:] = 0
        h = model.layers[2].output.save()
    return h, tracer


@intervene
def two_invokes(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.layers[2].output.save()
        with tracer.invoke(x2):
            b = model.layers[2].output.save()
    return a, b


def _plain(net, x, write_at=None, read_at=2):
    kept = []
    hooks = []
    if write_at is not None:
        hooks.append(net.layers[write_at].register_forward_hook(
            lambda m, a, out: out.__setitem__(slice(None), 0)))
    hooks.append(net.layers[read_at].register_forward_hook(lambda m, a, out: kept.append(out)))
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return kept[0]


def test_plain_trace_matches_hooks_and_leaves_nothing_behind():
    net = tiny_mlp(n_layers=4, hidden=8, seed=0)
    model = NNsight(net)
    x = torch.randn(3, 8)
    for _ in range(3):  # the first trace learns the order; later ones take the fast path
        h, tracer = save_and_write(model, x)
        assert torch.equal(h, _plain(net, x, write_at=1))
        assert tracer._plain  # the fast path was taken
        assert root_state(model).running is None
        assert getattr(interleave._ACTIVE, "inter", None) is None
        assert "forward" not in net.layers[1].__dict__ and "forward" not in net.layers[2].__dict__
        ref = weakref.ref(tracer)
        del tracer
        gc.collect()
        assert ref() is None  # nothing keeps the tracer (and its inputs) alive


def test_invokes_rows_match_plain_slicing():
    net = tiny_mlp(n_layers=4, hidden=8, seed=0)
    model = NNsight(net)
    x1, x2 = torch.randn(2, 8), torch.randn(3, 8)
    a, b = two_invokes(model, x1, x2)
    whole = _plain(net, torch.cat([x1, x2]))
    assert torch.equal(a, whole[:2]) and torch.equal(b, whole[2:])
    assert root_state(model).running is None


def test_failed_trace_forgets_the_running_tracer():
    net = tiny_mlp(n_layers=4, hidden=8, seed=0)
    model = NNsight(net)
    try:
        save_and_write(model, torch.randn(3, 5))  # wrong width: the forward raises
    except RuntimeError:
        pass
    else:
        raise AssertionError("expected the forward to fail")
    assert root_state(model).running is None
    assert getattr(interleave._ACTIVE, "inter", None) is None
    h, _ = save_and_write(model, torch.ones(2, 8))
    assert torch.equal(h, _plain(net, torch.ones(2, 8), write_at=1))


def test_handle_block_sets_every_attribute_tracer_init_sets():
    """Handle.block makes its Tracer without calling __init__ (one frame less per trace):
    an attribute added to Tracer.__init__ must be set there too."""
    import ast
    import inspect
    import textwrap

    from runtime.api import Handle
    from runtime.tracer import Tracer

    def attributes_set(fn, name: str) -> set[str]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        return {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == name}

    in_init = attributes_set(Tracer.__init__, "self")
    assert in_init >= {"_root", "_kind", "_block", "_sites", "_args", "_kwargs", "_lanes"}
    assert in_init <= attributes_set(Handle.block, "tracer")
