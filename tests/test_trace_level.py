"""Trace-level code outside invokes (issue 13): code before the first invoke runs
before the pass, code after the last invoke once every invoke is done; several step
blocks in one generate block each run at their own steps."""

from __future__ import annotations

import pytest
import torch
from support import layer_outputs

from compiler import CompileError, intervene
from runtime import LanguageModel, NNsight, save
from runtime.models import tiny_llama, tiny_mlp


def test_a_list_saved_before_the_invokes_and_a_sum_after_them():
    net = tiny_mlp()
    model = NNsight(net)
    x1, x2 = torch.randn(2, 8), torch.randn(2, 8)

    @intervene
    def f(model, x1, x2):
        with model.trace() as tracer:
            outs = list().save()  # noqa: C408 - as nnsight users write it
            with tracer.invoke(x1):
                a = model.layers[1].output.save()
                outs.append(a)
            with tracer.invoke(x2):
                b = model.layers[1].output.save()
                outs.append(b)
            total = (a + b).save()
            n = len(outs)
            outs.save()
        return outs, total, n

    outs, total, n = f(model, x1, x2)
    w1, w2 = layer_outputs(net, x1)[1], layer_outputs(net, x2)[1]
    assert n == 2 and torch.equal(outs[0], w1) and torch.equal(outs[1], w2)
    assert torch.equal(total, w1 + w2)
    assert f.plan.functions[0].blocks[0].saved == ("a", "b", "outs", "total")


def test_the_same_without_a_decorator():
    net = tiny_mlp()
    model = NNsight(net)
    x1, x2 = torch.randn(2, 8), torch.randn(2, 8)
    with model.trace() as tracer:
        outs = [].save()
        with tracer.invoke(x1):
            a = model.layers[0].output.save()
        with tracer.invoke(x2):
            b = model.layers[0].output.save()
            outs.append(b)
        total = (a * b).save()
    assert torch.equal(total, layer_outputs(net, x1)[0] * layer_outputs(net, x2)[0])
    assert len(outs) == 1


def test_module_values_after_the_invokes_are_still_refused():
    with pytest.raises(CompileError, match="outside any invoke"):
        @intervene
        def f(model, x):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    a = model.layers[0].output.save()
                c = model.layers[1].output.save()
            return a, c


# -- several step blocks in one generate block ------------------------------------------


def _steps_by_hooks(net, ids, n_new: int) -> list:
    """lm_head's output at each generation step, by a plain PyTorch hook."""
    seen = []
    hook = net.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        out = net.generate(ids, max_new_tokens=n_new, do_sample=False)
    finally:
        hook.remove()
    return seen, out


def test_step_blocks_one_after_another_run_at_their_own_steps():
    model = LanguageModel(tiny_llama(0), tokenizer=None)
    ids = torch.tensor([[1, 5, 9, 2]])

    @intervene
    def f(model, ids):
        with model.generate(ids, max_new_tokens=6) as tracer:
            early = [].save()
            with tracer.iter[0:2]:
                early.append(model.lm_head.output)
            between = save(len(early))  # runs once steps 0 and 1 are done
            with tracer.iter[5]:
                last = model.lm_head.output.save()
        return early, last, between

    early, last, n = f(model, ids)
    seen, _ = _steps_by_hooks(model._module, ids, 6)
    assert n == 2 and len(early) == 2
    assert torch.equal(early[0], seen[0]) and torch.equal(early[1], seen[1])
    assert torch.equal(last, seen[5])
    kinds = [i.kind for i in f.plan.functions[0].blocks[0].lanes[0].items if hasattr(i, "kind")]
    assert kinds.count("steps") == 2 and kinds.count("end-steps") == 1


# -- `with tracer.invoke(x) as invoker:` -------------------------------------------------


def test_invoker_inputs_in_a_compiled_block():
    net = tiny_mlp()
    model = NNsight(net)
    x1, x2 = torch.randn(2, 8), torch.randn(3, 8)

    @intervene
    def f(model, x1, x2):
        with model.trace() as tracer:
            with tracer.invoke(x1) as first:
                seen = save(first.inputs)
                a = model.layers[0].output.save()
            with tracer.invoke(x2) as second:
                b = model.layers[0].output.save()
                later = save(second.inputs)
        return seen, later, a, b

    seen, later, a, b = f(model, x1, x2)
    assert torch.equal(seen[0][0], x1) and torch.equal(later[0][0], x2)
    assert torch.equal(a, net.layers[0](x1)) and torch.equal(b, net.layers[0](x2))
    # `.inputs` of an invoker is not a module value: not in the plan
    assert [cp.path for lane in f.plan.functions[0].blocks[0].lanes
            for cp in lane.checkpoints] == ["model.layers[0]", "model.layers[0]"]


# -- edit blocks ---------------------------------------------------------------------------


def test_edit_block_compiled_and_undecorated():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)
    with model.edit() as edited:
        model.layers[0].output[:] = 0
    with edited.trace(x):
        out = edited.layers[1].output.save()
    assert torch.equal(out, net.layers[1](torch.zeros(3, 8)))
    with model.trace(x):  # the original stays untouched
        plain = model.layers[1].output.save()
    assert torch.equal(plain, layer_outputs(net, x)[1])


def test_edit_block_errors():
    with pytest.raises(CompileError, match=r"`.save\(\)` in an edit block: nothing runs"):
        @intervene
        def f(model):
            with model.edit() as edited:
                h = model.layers[0].output.save()
            return edited, h

    with pytest.raises(CompileError, match=r"`tracer.invoke\(...\)` in an edit block"):
        @intervene
        def g(model, x):
            with model.edit() as edited:  # noqa: SIM117
                with edited.invoke(x):
                    model.layers[0].output[:] = 0
            return edited


def test_skip_is_a_marker_in_the_plan_and_runs():
    net = tiny_mlp()
    model = NNsight(net)
    x = torch.randn(3, 8)

    @intervene
    def f(model, x, v):
        with model.trace(x):
            model.layers[1].skip(v)
            out = model.layers[2].output.save()
        return out

    v = torch.ones(3, 8)
    out = f(model, x, v)
    hook = net.layers[1].register_forward_hook(lambda m, i, o: v)
    try:
        seen = []
        h2 = net.layers[2].register_forward_hook(lambda m, i, o: seen.append(o))
        net(x)
        h2.remove()
    finally:
        hook.remove()
    assert torch.equal(out, seen[0])
    items = f.plan.functions[0].blocks[0].lanes[0].items
    assert (items[0].kind, items[0].detail) == ("skip", "layers[1]")
    assert "-- skip layers[1]" in str(f.plan)


# -- sessions ------------------------------------------------------------------------------


def test_in_a_session_a_later_trace_reads_an_earlier_ones_values_without_save():
    net = tiny_mlp()
    model = NNsight(net)
    x1, x2 = torch.randn(3, 8), torch.randn(3, 8)

    @intervene
    def f(model, x1, x2):
        with model.session():
            with model.trace(x1):
                h = model.layers[0].output  # not saved: the next trace of the session reads it
            with model.trace(x2):
                model.layers[0].output[:] = h
                out = model.output.save()
        return out

    out = f(model, x1, x2)
    hook = net.layers[0].register_forward_hook(lambda m, i, o: layer_outputs(net_copy, x1)[0])
    net_copy = tiny_mlp()
    try:
        want = net(x2)
    finally:
        hook.remove()
    assert torch.equal(out, want)
    assert f.plan.functions[0].blocks[0].saved == ("h",)


def test_outside_a_session_the_unsaved_value_is_still_an_error():
    with pytest.raises(CompileError, match="without being saved"):
        @intervene
        def f(model, x1, x2):
            with model.trace(x1):
                h = model.layers[0].output
            with model.trace(x2):
                model.layers[0].output[:] = h
            return 0
