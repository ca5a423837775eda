"""The runtime under hostile use (issue 10): unfinished first passes, threads, a trace
inside a trace, writes and ``retain_grad`` in invokes, ``tracer.stop()``, impossible
step selections, the user's ``StopIteration``, reference cycles, interrupts, and the
per-model record of checked blocks.

Every value is compared with plain PyTorch on the same tiny model; after every run no
hook or wrapped ``forward`` may stay on the model.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import traceback
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from support import assert_no_hooks, forward_hooks, line_in, x_input

from compiler import intervene
from runtime import LanguageModel, MissedCheckpointError, NNsight, OutOfOrderError
from runtime.models import tiny_llama, tiny_mlp

THIS_FILE = Path(__file__).resolve()
IDS = torch.tensor([[1, 5, 6, 7, 9]])


def line_of(marker: str) -> int:
    return line_in(THIS_FILE, marker)


def user_frames(exc: BaseException) -> list[int]:
    """Lines of this file in ``exc``'s traceback."""
    return [f.lineno for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).resolve() == THIS_FILE]


@pytest.fixture
def mlp():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    yield model, tiny_mlp(n_layers=4, hidden=8, seed=0)
    assert_no_hooks(model)


def tiny_lm() -> LanguageModel:
    return LanguageModel(tiny_llama(0), tokenizer=None)


def plain_outputs(net, x, names):
    """Plain forward of ``net`` capturing the outputs of the named submodules."""
    seen = {}
    mods = dict(net.named_modules())

    def keep(name):
        def hook(mod, args, out):
            seen[name] = out
        return hook

    with forward_hooks({mods[n]: keep(n) for n in names}):
        out = net(x)
    return out, seen


# --------------------------------------------------------------------------------------
# 1. Order facts from an unfinished first pass
# --------------------------------------------------------------------------------------


@intervene
def save_then_stop(model, ids):
    with model.trace(ids) as tracer:
        h = model.model.layers[0].output.save()
        tracer.stop()
    return h


@intervene
def save_then_fail(model, ids):
    with model.trace(ids):
        h = model.model.layers[0].output.save()
        raise KeyError("boom")
    return h


@intervene
def generate_mlp_then_attn(model, ids, i):
    with model.generate(ids, max_new_tokens=3, do_sample=False):
        a = model.model.layers[i].mlp.output.save()
        b = model.model.layers[i].self_attn.output.save()  # GEN-LATE
    return a, b


@intervene
def trace_mlp_then_attn(model, ids, i):
    with model.trace(ids):
        a = model.model.layers[i].mlp.output.save()
        b = model.model.layers[i].self_attn.output.save()  # TRACE-LATE
    return a, b


@pytest.mark.parametrize("first", [save_then_stop, save_then_fail])
def test_unfinished_first_pass_teaches_no_order(first):
    model = tiny_lm()
    with pytest.raises(KeyError) if first is save_then_fail else _nothing():
        first(model, IDS)
    assert not model._order_complete
    # layer 1 never ran in that pass: its order must still be found out, not guessed
    with pytest.raises(OutOfOrderError) as info:
        generate_mlp_then_attn(model, IDS, 1)
    assert info.value.line == line_of("# GEN-LATE")
    assert_no_hooks(model)


def test_unfinished_first_pass_gives_no_false_missed_error():
    model = tiny_lm()
    save_then_stop(model, IDS)
    with pytest.raises(OutOfOrderError) as info:
        trace_mlp_then_attn(model, IDS, 1)
    assert info.value.line == line_of("# TRACE-LATE")
    assert model._order_complete  # that pass ran to its end: now the order is known
    assert_no_hooks(model)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# 2. Two threads, one model
# --------------------------------------------------------------------------------------


@intervene
def write_and_read(model, x, k):
    with model.trace(x):
        model.layers[1].output[:] = k
        out = model.head.output.save()
    return out


@intervene
def read_two(model, x):
    with model.trace(x):
        a = model.layers[0].output.save()
        b = model.head.output.save()
    return a, b


def test_threads_on_one_model_never_cross():
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    xs = [x_input(seed, batch=2) for seed in range(4)]
    with torch.no_grad():
        expect_write = {}
        for t in range(4):
            h = torch.full((2, 8), float(t))
            for layer in ref.layers[2:]:
                h = torch.relu(layer(h))
            expect_write[t] = ref.head(h)
        expect_read = {t: plain_outputs(ref, xs[t], ["layers.0"]) for t in range(4)}
    errors: list = []

    def worker(t):
        try:
            for _ in range(600):
                if t % 2:
                    out = write_and_read(model, xs[t], float(t))
                    if not torch.equal(out, expect_write[t]):
                        errors.append(("write", t))
                else:
                    a, b = read_two(model, xs[t])
                    out, seen = expect_read[t]
                    if not (torch.equal(a, seen["layers.0"]) and torch.equal(b, out)):
                        errors.append(("read", t))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with torch.no_grad():
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:5]
    assert_no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(xs[0]), ref(xs[0]))


@intervene
def slow_reader(model, x, log, started):
    with model.trace(x):
        a = model.layers[0].output.save()
        log.append("outer in")
        started.set()
        time.sleep(0.2)
        log.append("outer out")
    return a


@intervene
def quick_reader(model, x, log):
    with model.trace(x):
        a = model.layers[0].output.save()
        log.append("other")
    return a


def test_another_thread_waits_for_the_running_trace(mlp):
    model, _ = mlp
    log: list = []
    started = threading.Event()
    outer = threading.Thread(target=slow_reader, args=(model, x_input(), log, started))
    outer.start()
    assert started.wait(10)
    quick_reader(model, x_input(), log)
    outer.join(10)
    assert log == ["outer in", "outer out", "other"]


def test_a_plain_call_from_another_thread_waits_for_the_running_trace(mlp):
    # Without the lock the plain call would run through the trace's wrapped forwards
    # and be served to (or overwritten by) the other thread's lanes.
    model, _ = mlp
    expected = model._module(x_input(seed=5))
    log: list = []
    started = threading.Event()
    outer = threading.Thread(target=slow_reader, args=(model, x_input(), log, started))
    outer.start()
    assert started.wait(10)
    got = model(x_input(seed=5))
    log.append("plain")
    outer.join(10)
    assert log == ["outer in", "outer out", "plain"]
    assert torch.equal(got, expected)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# 3. A trace inside a trace of the same model
# --------------------------------------------------------------------------------------


@intervene
def inner(model, x):
    with model.trace(x):  # INNER-WITH
        h = model.layers[2].output.save()
    return h


@intervene
def outer_calls_inner(model, x):
    with model.trace(x):  # OUTER-WITH
        a = model.layers[0].output.save()
        b = inner(model, x).save()  # CALLS-INNER
    return a, b


@intervene
def outer_two_invokes_calls_inner(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            b = inner(model, x1).save()
        with tracer.invoke(x2):
            out = model.head.output.save()
    return b, out


def test_trace_inside_a_trace_of_the_same_model_is_refused(mlp):
    model, ref = mlp
    with pytest.raises(RuntimeError) as info:
        outer_calls_inner(model, x_input())
    msg = str(info.value)
    assert f"{THIS_FILE}:{line_of('# INNER-WITH')}" in msg
    assert f"{THIS_FILE}:{line_of('# OUTER-WITH')}" in msg
    assert "cannot run inside another trace of the same model" in msg
    assert "after the outer block" in msg
    assert line_of("# CALLS-INNER") in user_frames(info.value)
    assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="running a trace already"):
        outer_two_invokes_calls_inner(model, x_input(1, batch=2), x_input(2, batch=2))
    assert_no_hooks(model)
    # the model is free again: the same inner experiment alone works
    _, seen = plain_outputs(ref, x_input(), ["layers.2"])
    assert torch.equal(inner(model, x_input()), seen["layers.2"])


def test_trace_of_another_model_inside_a_trace_works(mlp):
    model, _ = mlp
    other = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=1))
    _, b = outer_calls_inner_other(model, other, x_input())
    _, seen = plain_outputs(tiny_mlp(n_layers=4, hidden=8, seed=1), x_input(), ["layers.2"])
    assert torch.equal(b, seen["layers.2"])
    assert_no_hooks(other)


@intervene
def outer_calls_inner_other(model, other, x):
    with model.trace(x):
        a = model.layers[0].output.save()
        b = inner(other, x).save()
    return a, b


# --------------------------------------------------------------------------------------
# 5. `x += 0` under no_grad in an invoke keeps the graph; 7. retain_grad in an invoke
# --------------------------------------------------------------------------------------


@intervene
def add_zero_no_grad_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            with torch.no_grad():
                model.layers[1].output += 0
            out = model.head.output.save()
        with tracer.invoke(x2):
            out2 = model.head.output.save()
    return out, out2


@intervene
def add_zero_no_grad_plain(model, x):
    with model.trace(x):
        with torch.no_grad():
            model.layers[1].output += 0
        out = model.head.output.save()
    return out


def test_in_place_no_grad_edit_in_an_invoke_keeps_the_graph():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=2)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    out, _ = add_zero_no_grad_invoke(model, x1, x2)
    out.sum().backward()
    got = model._module.layers[0].weight.grad
    assert got is not None
    plain_model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    add_zero_no_grad_plain(plain_model, torch.cat([x1, x2]))[:2].sum().backward()
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    ref(torch.cat([x1, x2]))[:2].sum().backward()
    assert torch.allclose(got, ref.layers[0].weight.grad, atol=1e-7)
    assert torch.allclose(plain_model._module.layers[0].weight.grad, ref.layers[0].weight.grad,
                          atol=1e-7)
    assert_no_hooks(model)


@intervene
def write_no_grad_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):  # noqa: SIM117
            with torch.no_grad():
                model.layers[1].output = model.layers[1].output * 2
        with tracer.invoke(x2):
            out2 = model.head.output.save()
    return out2


def test_a_no_grad_write_in_one_invoke_keeps_the_others_graph():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=2)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    write_no_grad_invoke(model, x1, x2).sum().backward()
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    ref(torch.cat([x1, x2]))[2:].sum().backward()
    assert torch.allclose(model._module.layers[0].weight.grad, ref.layers[0].weight.grad,
                          atol=1e-7)


@intervene
def retain_in_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            other = model.layers[1].output.save()
        with tracer.invoke(x2):
            hidden = model.layers[1].output.save()
            hidden.retain_grad()
            out = model.head.output.save()
    return other, hidden, out


@intervene
def requires_grad_in_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            hidden = model.layers[1].output.save()
            hidden.requires_grad = True
            out = model.head.output.save()
        with tracer.invoke(x2):
            out2 = model.head.output.save()  # noqa: F841
    return hidden, out


def reference_hidden_grad(x, rows, also=None):
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    out, seen = plain_outputs(ref, x, ["layers.1"])
    seen["layers.1"].retain_grad()
    loss = out[rows].sum()
    if also is not None:
        loss = loss + also(seen["layers.1"][rows])
    loss.backward()
    return seen["layers.1"].grad[rows]


def test_retain_grad_in_an_invoke_fills_grad():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    other, hidden, out = retain_in_invoke(model, x1, x2)
    out.sum().backward()
    expected = reference_hidden_grad(torch.cat([x1, x2]), slice(2, 5))
    assert hidden.grad is not None
    assert torch.equal(hidden.grad, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading .grad of a non-leaf warns
        assert other.grad is None  # only the value that asked retains its gradient
    # a second backward adds up, as retain_grad does
    model2 = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    _, hidden, out = retain_in_invoke(model2, x1, x2)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert torch.allclose(hidden.grad, 2 * expected)
    assert_no_hooks(model)


def test_retain_grad_in_an_invoke_when_the_view_is_used_too():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    _, hidden, out = retain_in_invoke(model, x1, x2)
    (out.sum() + (hidden * 3).sum()).backward()
    expected = reference_hidden_grad(torch.cat([x1, x2]), slice(2, 5), lambda h: (h * 3).sum())
    assert torch.allclose(hidden.grad, expected)


def test_requires_grad_in_an_invoke_fills_grad():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
    hidden, out = requires_grad_in_invoke(model, x1, x2)
    out.sum().backward()
    assert torch.equal(hidden.grad, reference_hidden_grad(torch.cat([x1, x2]), slice(0, 2)))


# --------------------------------------------------------------------------------------
# tracer.stop(): the code after it runs; module values after it are missed
# --------------------------------------------------------------------------------------


@intervene
def stop_then_compute(model, x):
    with model.trace(x) as tracer:
        a = model.layers[0].output.save()
        tracer.stop()
        b = (a * 2).save()
    return a, b


@intervene
def stop_then_read(model, x, log):
    with model.trace(x) as tracer:
        a = model.layers[0].output.save()
        tracer.stop()
        log.append("after stop")
        c = model.layers[2].output.save()  # READ-AFTER-STOP
    return a, c


@intervene
def stop_then_catch(model, x):
    with model.trace(x) as tracer:
        a = model.layers[0].output.save()
        tracer.stop()
        try:
            c = model.layers[2].output
        except MissedCheckpointError:
            c = None
        missed = (c is None).save()
    return a, missed


@intervene
def stop_first(model, x, log):
    with model.trace(x) as tracer:
        tracer.stop()
        log.append("ran")
    return log


class Counter(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_code_after_stop_runs(mlp):
    model, ref = mlp
    a, b = stop_then_compute(model, x_input())
    _, seen = plain_outputs(ref, x_input(), ["layers.0"])
    assert torch.equal(a, seen["layers.0"])
    assert torch.equal(b, seen["layers.0"] * 2)


def test_module_value_after_stop_is_missed_at_its_line(mlp):
    model, _ = mlp
    log: list = []
    with pytest.raises(MissedCheckpointError, match="after tracer.stop") as info:
        stop_then_read(model, x_input(), log)
    assert log == ["after stop"]
    assert info.value.line == line_of("# READ-AFTER-STOP")
    assert user_frames(info.value)[-1] == line_of("# READ-AFTER-STOP")
    _, missed = stop_then_catch(model, x_input())
    assert missed is True


def test_stop_before_any_module_runs_nothing():
    net = Counter(tiny_mlp(n_layers=4, hidden=8, seed=0))
    model = NNsight(net)
    assert stop_first(model, x_input(), []) == ["ran"]
    assert net.calls == 0
    assert_no_hooks(model)


def test_stop_outside_the_block_is_an_error(mlp):
    model, _ = mlp
    from runtime.tracer import Tracer

    tracer = Tracer(model, "trace", None, {}, (), {})
    with pytest.raises(RuntimeError, match="only inside its trace block"):
        tracer.stop()


# --------------------------------------------------------------------------------------
# Impossible step selections
# --------------------------------------------------------------------------------------


@intervene
def last_step(model, ids):
    with model.generate(ids, max_new_tokens=3, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.iter[-1]:  # ITER-NEG
            h = model.model.layers[0].output.save()
    return h


@intervene
def some_steps(model, ids, sel):
    with model.generate(ids, max_new_tokens=3, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.iter[sel]:  # ITER-SEL
            h = model.model.layers[0].output.save()
    return h


def test_negative_step_is_refused_at_its_line():
    model = tiny_lm()
    with pytest.raises(ValueError, match="negative steps") as info:
        last_step(model, IDS)
    assert user_frames(info.value)[-1] == line_of("# ITER-NEG")
    assert_no_hooks(model)


@pytest.mark.parametrize("sel, match", [
    (slice(-2, None), "negative steps"),
    (slice(3, 1), "selects no step"),
    (slice(2, 2), "selects no step"),
    ([], "selects no step"),
    ([1, -1], "negative steps"),
])
def test_impossible_selections_are_refused(sel, match):
    model = tiny_lm()
    with pytest.raises(ValueError, match=match) as info:
        some_steps(model, IDS, sel)
    assert user_frames(info.value)[-1] == line_of("# ITER-SEL")
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# The user's StopIteration
# --------------------------------------------------------------------------------------


@intervene
def raises_stop_iteration(model, x):
    with model.trace(x):
        a = model.layers[0].output.save()
        raise StopIteration("mine")  # USER-STOPITER
    return a


@intervene
def next_of_empty(model, x):
    with model.trace(x):
        a = model.layers[0].output.save()
        b = next(iter([])).save()  # NEXT-EMPTY
    return a, b


def test_user_stop_iteration_keeps_its_type_and_line(mlp):
    model, _ = mlp
    with pytest.raises(StopIteration, match="mine") as info:
        raises_stop_iteration(model, x_input())
    assert type(info.value) is StopIteration
    assert user_frames(info.value)[-1] == line_of("# USER-STOPITER")
    with pytest.raises(StopIteration) as info:
        next_of_empty(model, x_input())
    assert user_frames(info.value)[-1] == line_of("# NEXT-EMPTY")


# --------------------------------------------------------------------------------------
# Resources: no reference cycle keeps the run's tensors; interrupts; checked blocks
# --------------------------------------------------------------------------------------


@intervene
def missed_at_end(model, x):
    with model.trace(x):
        a = model.layers[0].output.save()
        b = model.layers[0].output.save()  # asked for after it ran: error at the end
    return a, b


@intervene
def lane_raises(model, x):
    with model.trace(x):
        a = model.head.output.save()
        raise IndexError("mine")
    return a


@intervene
def order_error_at_end(model, x, i):
    with model.trace(x):
        a = model.layers[2].output.save()
        b = model.layers[i].output.save()
    return a, b


FAILING = {
    "missed": lambda model, x: missed_at_end(model, x),
    "raises": lambda model, x: lane_raises(model, x),
    "order": lambda model, x: order_error_at_end(model, x, 1),
    "stop-iteration": lambda model, x: raises_stop_iteration(model, x),
    "nested": lambda model, x: outer_calls_inner(model, x),
    "after-stop": lambda model, x: stop_then_read(model, x, []),
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_a_failed_trace_makes_no_reference_cycle(mlp, case):
    """With the cyclic collector off, nothing of the run (the model's output included)
    outlives the caught error, and there is no cycle for the collector to find."""
    model, _ = mlp
    refs = []

    def keep(mod, args, out):
        refs.append(weakref.ref(out))

    try:  # warm up: compile, learn the order
        FAILING[case](model, x_input())
    except Exception:  # noqa: BLE001, S110
        pass
    x = x_input()
    refs.append(weakref.ref(x))
    handles = [model._module.register_forward_hook(keep),
               model._module.layers[0].register_forward_hook(keep)]
    gc.collect()
    gc.disable()
    try:
        try:
            FAILING[case](model, x)
        except Exception:  # noqa: BLE001, S110 - the error itself is tested elsewhere
            pass
        del x
        for h in handles:
            h.remove()
        assert all(r() is None for r in refs)
        assert gc.collect() == 0
    finally:
        for h in handles:
            h.remove()
        gc.enable()


class Interrupting(torch.nn.Module):
    """Raises KeyboardInterrupt on its ``when``-th call."""

    def __init__(self, inner, when):
        super().__init__()
        self.inner = inner
        self.when = when
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.when:
            raise KeyboardInterrupt
        return self.inner(x)


@intervene
def read_all(model, x):
    with model.trace(x):
        hs = [layer.output.save() for layer in model.layers]
        out = model.output.save()
    return hs, out


def test_interrupt_from_a_module_forward_leaves_nothing():
    net = tiny_mlp(n_layers=4, hidden=8, seed=0)
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    for when in range(1, 5):
        layer = Interrupting(net.layers[2], when)
        net.layers[2] = layer
        model = NNsight(net)
        for _ in range(when):
            try:
                read_all(model, x_input())
            except KeyboardInterrupt:
                pass
            assert_no_hooks(model)
        net.layers[2] = layer.inner
        model = NNsight(net)
        assert torch.equal(read_all(model, x_input())[1], ref(x_input()))


def _interrupt_at(n: int, files: set[str]):
    """A trace function raising KeyboardInterrupt as the n-th call of a function of
    ``files`` begins: where CPython delivers a real Ctrl-C (on entering a function)."""
    count = [0]

    def global_(frame, event, arg):
        if frame.f_code.co_filename in files:
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt

    return global_, count


def test_interrupt_as_any_runtime_call_begins_leaves_nothing():
    import runtime.api
    import runtime.envoy
    import runtime.interleave
    import runtime.nnsight
    import runtime.tracer

    files = {m.__file__ for m in (runtime.api, runtime.envoy, runtime.interleave,
                                  runtime.nnsight, runtime.tracer)} | {str(THIS_FILE)}
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0)
    x = x_input()
    expected = ref(x)
    for learned in (False, True):
        n = 1
        while True:
            model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
            if learned:
                read_all(model, x)
            tracer_fn, _ = _interrupt_at(n, files)
            interrupted = False
            sys.settrace(tracer_fn)
            try:
                read_all(model, x)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.settrace(None)
            assert_no_hooks(model)
            # the model is usable at once, from this thread and from another one
            assert torch.equal(read_all(model, x)[1], expected)
            done = []
            th = threading.Thread(target=lambda m=model, d=done: d.append(read_all(m, x)[1]))
            th.start()
            th.join(10)
            assert done and torch.equal(done[0], expected)
            if not interrupted:
                break
            n += 1
        assert n > 20  # the loop did reach many lines


def _interrupted_at(monkeypatch, model, owner, name: str, at: int) -> None:
    """``owner.name`` raises KeyboardInterrupt at its ``at``-th call during a trace of
    ``model``; the trace raises it and leaves no hook behind."""
    real = getattr(owner, name)
    calls = [0]

    def flaky(*args):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(owner, name, flaky)
    with pytest.raises(KeyboardInterrupt):
        read_all(model, x_input())
    monkeypatch.setattr(owner, name, real)
    assert_no_hooks(model)


def test_interrupt_during_cleanup_still_removes_everything(mlp, monkeypatch):
    from runtime import interleave

    model, ref = mlp
    for at in range(1, 7):
        _interrupted_at(monkeypatch, model, interleave, "_undo", at)
    assert torch.equal(read_all(model, x_input())[1], ref(x_input()))


def test_interrupt_while_removing_order_hooks(monkeypatch):
    from torch.utils.hooks import RemovableHandle

    for at in (1, 3, 7):
        model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0))
        _interrupted_at(monkeypatch, model, RemovableHandle, "remove", at)


def test_checked_blocks_stay_bounded(mlp, monkeypatch):
    import runtime.tracer

    monkeypatch.setattr(runtime.tracer, "_CHECKED_MAX", 8)
    model, _ = mlp
    for _ in range(20):
        @intervene
        def fresh(model, x):
            with model.trace(x):
                h = model.layers[1].output.save()
            return h

        fresh(model, x_input())
    assert len(model._checked) == 8


# --------------------------------------------------------------------------------------
# `x.requires_grad = True` on an invoke's rows of a model with frozen parameters
# --------------------------------------------------------------------------------------


@intervene
def frozen_requires_grad_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            other = model.head.output.save()
        with tracer.invoke(x2):
            hidden = model.layers[1].output.save()
            hidden.requires_grad = True
            out = model.head.output.save()
    return other, hidden, out


@intervene
def frozen_backward_block_invoke(model, x1, x2):
    with model.trace() as tracer:
        with tracer.invoke(x1):
            other = model.head.output.save()  # noqa: F841
        with tracer.invoke(x2):
            hidden = model.layers[1].output
            hidden.requires_grad = True
            out = model.head.output
            with out.sum().backward():
                grad = hidden.grad.save()
    return grad


def frozen_reference(x, rows):
    """Plain PyTorch: the frozen model's layer-1 output made a leaf that requires grad."""
    ref = tiny_mlp(n_layers=4, hidden=8, seed=0).requires_grad_(False)
    kept = {}

    def leaf(mod, args, out):
        kept["h"] = out.detach().requires_grad_(True)
        return kept["h"]

    with forward_hooks({ref.layers[1]: leaf}):
        out = ref(x)
    out[rows].sum().backward()
    return out, kept["h"].grad[rows]


def test_requires_grad_on_invoke_rows_of_a_frozen_model():
    x1, x2 = x_input(1, batch=2), x_input(2, batch=3)
    model = NNsight(tiny_mlp(n_layers=4, hidden=8, seed=0).requires_grad_(False))
    other, hidden, out = frozen_requires_grad_invoke(model, x1, x2)
    ref_out, ref_grad = frozen_reference(torch.cat([x1, x2]), slice(2, 5))
    assert torch.equal(out, ref_out[2:]) and torch.equal(other, ref_out[:2])
    out.sum().backward()
    assert torch.equal(hidden.grad, ref_grad)
    assert torch.equal(frozen_backward_block_invoke(model, x1, x2), ref_grad)
    assert_no_hooks(model)


@intervene
def stop_at_step_one(model, ids):
    with model.generate(ids, max_new_tokens=5, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.iter[1]:
            h = model.model.layers[0].output.save()
            tracer.stop()
            after = (h * 2).save()
    return h, after


def test_stop_in_a_step_block_ends_generation():
    model = LanguageModel(tiny_llama(0), tokenizer=None)
    calls = []
    with torch.no_grad():
        with forward_hooks(pre={model._module: lambda m, a, k: calls.append(1)}):
            h, after = stop_at_step_one(model, IDS)
        ref = tiny_llama(0)
        seen = []
        with forward_hooks(out={ref.model.layers[0]: lambda m, a, o: seen.append(o)}):
            ref.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=2,
                         do_sample=False)
    assert len(calls) == 2  # step 0, and step 1 stopped after layer 0
    assert torch.allclose(h, seen[1], atol=1e-6)
    assert torch.equal(after, h * 2)
    assert_no_hooks(model)


def test_model_lock_makes_plain_calls_wait(mlp):
    from runtime.tracer import model_lock

    model, ref = mlp
    log: list = []
    started = threading.Event()
    outer = threading.Thread(target=slow_reader, args=(model, x_input(), log, started))
    outer.start()
    assert started.wait(10)
    with model_lock(model._module):
        log.append("plain")
        out = model(x_input())
    outer.join(10)
    assert log == ["outer in", "outer out", "plain"]
    assert torch.equal(out, ref(x_input()))
