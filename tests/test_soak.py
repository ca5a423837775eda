"""Soak: thousands of traces of tiny models, mixed successes and failures (user
exceptions, ``tracer.stop()``, out-of-order and missed values, nested traces, bad step
selections), from one thread and then several.  Afterwards nothing is left on the
models and memory is flat: the number of live objects and tensors does not grow with
the number of traces.  Every successful value is checked against plain PyTorch.
"""

from __future__ import annotations

import gc
import random
import threading

import torch
from support import assert_no_hooks, x_input

from compiler import intervene
from runtime import LanguageModel, MissedCheckpointError, NNsight, OutOfOrderError
from runtime.models import tiny_llama, tiny_mlp


class WithUnused(torch.nn.Module):
    """A tiny MLP plus a module its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp(n_layers=4, hidden=8, seed=0)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.net(x)


@intervene
def ok_save(model, x):
    with model.trace(x):
        h = model.net.layers[1].output.save()
        out = model.output.save()
    return h, out


@intervene
def ok_write(model, x):
    with model.trace(x):
        model.net.layers[1].output[:] = 0
        out = model.output.save()
    return out


@intervene
def user_error(model, x):
    with model.trace(x):
        h = model.net.layers[2].output.save()
        raise IndexError("mine")
    return h


@intervene
def stopped(model, x):
    with model.trace(x) as tracer:
        h = model.net.layers[0].output.save()
        tracer.stop()
        later = model.net.head.output.save()
    return h, later


@intervene
def out_of_order(model, x, i):
    with model.trace(x):
        a = model.net.layers[3].output.save()
        b = model.net.layers[i].output.save()
    return a, b


@intervene
def missed(model, x):
    with model.trace(x):
        a = model.net.layers[0].output.save()
        b = model.unused.output.save()
    return a, b


@intervene
def nested(model, x):
    with model.trace(x):
        a = model.net.layers[0].output.save()
        b = ok_write(model, x).save()
    return a, b


@intervene
def invokes(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            a = model.net.layers[1].output.save()
        with tracer.invoke(x2):
            model.net.layers[1].output += 1
            b = model.output.save()
    return a, b


@intervene
def steps(model, ids, sel):
    with model.generate(ids, max_new_tokens=2, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.iter[sel]:
            h = model.model.layers[0].output.save()
    return h


def reference(x):
    net = WithUnused()
    seen = {}
    handle = net.net.layers[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    with torch.no_grad():
        out = net(x)
        h = torch.zeros_like(seen["h"])
        for layer in net.net.layers[2:]:
            h = torch.relu(layer(h))
        zeroed = net.net.head(h)
    handle.remove()
    return seen["h"], out, zeroed


def one_round(model, rng, xs, refs, errors):
    kind = rng.randrange(8)
    i = rng.randrange(len(xs))
    x = xs[i]
    h_ref, out_ref, zeroed_ref = refs[i]
    try:
        if kind == 0:
            h, out = ok_save(model, x)
            ok = torch.equal(h, h_ref) and torch.equal(out, out_ref)
        elif kind == 1:
            ok = torch.equal(ok_write(model, x), zeroed_ref)
        elif kind == 2:
            try:
                user_error(model, x)
                ok = False
            except IndexError:
                ok = True
        elif kind == 3:
            try:
                stopped(model, x)
                ok = False
            except MissedCheckpointError:
                ok = True
        elif kind == 4:
            try:
                out_of_order(model, x, rng.randrange(3))
                ok = False
            except OutOfOrderError:
                ok = True
        elif kind == 5:
            try:
                missed(model, x)
                ok = False
            except MissedCheckpointError:
                ok = True
        elif kind == 6:
            try:
                nested(model, x)
                ok = False
            except RuntimeError as exc:
                ok = "running a trace already" in str(exc)
        else:
            j = (i + 1) % len(xs)
            a, b = invokes(model, x, xs[j])
            ok = torch.equal(a, h_ref) and b.shape == out_ref.shape
        if not ok:
            errors.append(kind)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append((kind, repr(exc)))


def live_counts() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))


def test_soak_mixed_failures_leave_nothing_and_memory_flat():
    model = NNsight(WithUnused())
    xs = [x_input(seed, batch=2) for seed in range(4)]
    refs = [reference(x) for x in xs]
    rng = random.Random(0)
    errors: list = []
    with torch.no_grad():
        for _ in range(300):  # warm up: caches, compiled plans, order facts
            one_round(model, rng, xs, refs, errors)
        before = live_counts()
        for _ in range(2000):
            one_round(model, rng, xs, refs, errors)
        assert_no_hooks(model)

        def worker(seed):
            r = random.Random(seed)
            for _ in range(300):
                one_round(model, r, xs, refs, errors)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        after = live_counts()
    assert not errors, errors[:10]
    assert_no_hooks(model)
    assert after[1] - before[1] <= 10, (before, after)  # tensors
    assert after[0] - before[0] <= 300, (before, after)  # all objects


def test_soak_generation_steps_and_bad_selections():
    model = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[1, 5, 6, 7]])
    rng = random.Random(1)
    with torch.no_grad():
        expected = steps(model, ids, 1)
        for _ in range(3):
            steps(model, ids, 0)
        before = live_counts()
        for _ in range(40):
            sel = rng.choice([1, 0, -1, [], slice(2, 1)])
            try:
                got = steps(model, ids, sel)
            except ValueError:
                assert sel in (-1, []) or isinstance(sel, slice)
                continue
            if sel == 1:
                assert torch.equal(got, expected)
        after = live_counts()
    assert_no_hooks(model)
    assert after[1] - before[1] <= 10, (before, after)
    assert after[0] - before[0] <= 300, (before, after)
