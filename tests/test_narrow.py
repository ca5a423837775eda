"""What an invoke sees of values without the batch dimension first.

An invoke sees its own rows of a module value: the rows of every tensor whose first
dimension is the batch's.  A tensor without it (a ``[1, seq, ...]`` broadcast such as
GPT-2's position embeddings or Llama's rotary cos/sin when the model is given no
``position_ids``) is not the invoke's rows: each invoke sees it whole, and what one
writes there replaces it whole.  Checked against plain forward hooks on the batched
forward, on a tiny Llama and a tiny GPT-2 wrapped as ``NNsight`` (no position ids given:
their positions are ``[1, seq]``).
"""

from __future__ import annotations

import pytest
import torch
from support import assert_no_hooks, forward_hooks

from compiler import intervene
from runtime import NNsight
from runtime.interleave import narrow, widen
from runtime.models import tiny_llama

A = torch.tensor([[5, 6, 7, 8]])
B = torch.tensor([[9, 10, 11, 12]])
C = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama():
    model = NNsight(tiny_llama(0))
    with torch.no_grad():
        yield model
    assert_no_hooks(model._module)


@pytest.fixture
def gpt2():
    model = NNsight(_gpt2())
    with torch.no_grad():
        yield model
    assert_no_hooks(model._module)


def _batched(module, ids, out=None, pre=None):
    with forward_hooks(out, pre):
        return module(ids)


# --------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------


@intervene
def _llama_reads(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            rot0 = model.model.rotary_emb.output.save()
            kw0 = model.model.layers[0].self_attn.inputs.save()
            h0 = model.model.layers[0].output.save()
        with tracer.invoke(b):
            rot1 = model.model.rotary_emb.output.save()
            kw1 = model.model.layers[0].self_attn.inputs.save()
            h1 = model.model.layers[0].output.save()
    return rot0, kw0, h0, rot1, kw1, h1


def test_llama_rotary_broadcast_is_seen_whole(llama):
    seen = {}
    m = llama._module.model
    out = {m.rotary_emb: lambda mod, args, o: seen.__setitem__("rot", o),
           m.layers[0]: lambda mod, args, o: seen.__setitem__("h", o)}
    pre = {m.layers[0].self_attn: lambda mod, args, kw: seen.__setitem__("kw", kw)}
    _batched(llama._module, torch.cat([A, B]), out, pre)
    assert seen["rot"][0].shape[0] == 1  # the model's own [1, seq, dim] broadcast

    rot0, kw0, h0, rot1, kw1, h1 = _llama_reads(llama, A, B)
    for rot, kw in ((rot0, kw0), (rot1, kw1)):
        # Before: invoke 1 got rows 1:2 of a 1-row tensor (empty).
        assert torch.equal(rot[0], seen["rot"][0]) and torch.equal(rot[1], seen["rot"][1])
        assert torch.equal(kw[1]["position_ids"], seen["kw"]["position_ids"])
        assert torch.equal(kw[1]["position_embeddings"][0], seen["rot"][0])
    # Batch-major values are still each invoke's own rows.
    assert torch.equal(kw0[1]["hidden_states"], seen["kw"]["hidden_states"][0:1])
    assert torch.equal(kw1[1]["hidden_states"], seen["kw"]["hidden_states"][1:2])
    assert torch.equal(h0, seen["h"][0:1]) and torch.equal(h1, seen["h"][1:2])


@intervene
def _gpt2_reads(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            p0 = model.transformer.wpe.output.save()
        with tracer.invoke(b):
            e1 = model.transformer.wte.output.save()
            p1 = model.transformer.wpe.output.save()
            ids1 = model.transformer.h[0].inputs.save()
    return p0, p1, e1, ids1


def test_gpt2_position_embeddings_are_seen_whole(gpt2):
    seen = {}
    t = gpt2._module.transformer
    out = {t.wpe: lambda mod, args, o: seen.__setitem__("wpe", o),
           t.wte: lambda mod, args, o: seen.__setitem__("wte", o)}
    pre = {t.h[0]: lambda mod, args, kw: seen.__setitem__("h0", kw)}
    _batched(gpt2._module, torch.cat([A, B]), out, pre)
    assert seen["wpe"].shape == (1, 4, 32)

    p0, p1, e1, ids1 = _gpt2_reads(gpt2, A, B)
    assert torch.equal(p0, seen["wpe"]) and torch.equal(p1, seen["wpe"])
    assert torch.equal(e1, seen["wte"][1:2])
    assert torch.equal(ids1[1]["position_ids"], seen["h0"]["position_ids"])


@intervene
def _three_invokes(model, a, c):
    with model.trace() as tracer:
        with tracer.invoke(a):
            p0 = model.transformer.wpe.output.save()
        with tracer.invoke(c):  # two rows
            p1 = model.transformer.wpe.output.save()
            logits = model.lm_head.output.save()
        with tracer.invoke():  # no input: the whole batch
            everything = model.lm_head.output.save()
    return p0, p1, logits, everything


def test_invoke_of_several_rows_and_whole_batch(gpt2):
    seen = {}
    t = gpt2._module.transformer
    out = {t.wpe: lambda mod, args, o: seen.__setitem__("wpe", o)}
    want = _batched(gpt2._module, torch.cat([A, C]), out).logits
    p0, p1, logits, everything = _three_invokes(gpt2, A, C)
    assert torch.equal(p0, seen["wpe"]) and torch.equal(p1, seen["wpe"])
    assert torch.equal(logits, want[1:3]) and torch.equal(everything, want)


# --------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------


@intervene
def _gpt2_write_positions(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            model.transformer.wpe.output = model.transformer.wpe.output * 0
            logits = model.lm_head.output.save()
        with tracer.invoke():
            everything = model.lm_head.output.save()
    return logits, everything


def test_write_to_a_value_without_batch_dim_replaces_it_whole(gpt2):
    t = gpt2._module.transformer
    want = _batched(gpt2._module, torch.cat([A, B]),
                    {t.wpe: lambda mod, args, o: o * 0}).logits
    logits, everything = _gpt2_write_positions(gpt2, A, B)
    assert torch.equal(everything, want)  # every invoke's rows see it (it is shared)
    assert torch.equal(logits, want[1:2])


@intervene
def _gpt2_write_rows(model, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            model.transformer.wte.output = model.transformer.wte.output * 0
        with tracer.invoke():
            everything = model.lm_head.output.save()
    return everything


def test_write_to_batch_rows_stays_in_the_invoke(gpt2):
    t = gpt2._module.transformer

    def zero_row1(mod, args, o):
        o = o.clone()
        o[1:2] = 0
        return o

    want = _batched(gpt2._module, torch.cat([A, B]), {t.wte: zero_row1}).logits
    assert torch.equal(_gpt2_write_rows(gpt2, A, B), want)


@intervene
def _gpt2_skip_positions(model, a, b, value):
    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            model.transformer.wte.output.save()  # a checkpoint: the lane runs with its rows
            model.transformer.wpe.skip(value)
        with tracer.invoke():
            everything = model.lm_head.output.save()
    return everything


def test_skip_of_a_module_without_batch_dim(gpt2):
    t = gpt2._module.transformer
    value = torch.full((1, 4, 32), 0.5)
    want = _batched(gpt2._module, torch.cat([A, B]), {t.wpe: lambda mod, args, o: value}).logits
    assert torch.equal(_gpt2_skip_positions(gpt2, A, B, value), want)


# --------------------------------------------------------------------------------------
# narrow / widen themselves
# --------------------------------------------------------------------------------------


def test_narrow_slices_only_batch_major_tensors():
    batch_major = torch.arange(12.0).reshape(3, 4)
    broadcast = torch.arange(4.0).reshape(1, 4)
    seq = torch.arange(5)
    scalar = torch.tensor(2.0)
    value = ({"x": batch_major, "pos": broadcast}, [seq, scalar], "keep")
    got = narrow(value, slice(1, 2), 3)
    assert torch.equal(got[0]["x"], batch_major[1:2])
    assert got[0]["pos"] is broadcast and got[1][0] is seq and got[1][1] is scalar
    assert got[2] == "keep"
    # Without a batch size (a caller that knows none): every tensor is sliced, as before.
    assert narrow(broadcast, slice(0, 1)).shape == (1, 4)
    assert narrow(seq, slice(1, 2)).shape == (1,)


def test_widen_writes_rows_of_batch_major_and_replaces_others():
    batch_major = torch.zeros(3, 4)
    broadcast = torch.zeros(1, 4)
    new_rows, new_whole = torch.ones(1, 4), torch.full((1, 4), 7.0)
    got = widen((batch_major, broadcast), (new_rows, new_whole), slice(2, 3), 3)
    assert torch.equal(got[0][2], torch.ones(4)) and torch.equal(got[0][:2], torch.zeros(2, 4))
    assert got[1] is new_whole
    assert torch.equal(batch_major, torch.zeros(3, 4))  # a copy was written, not the batch


@intervene
def _skip_only(model, a, b, value):
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.transformer.h[0].mlp.skip(value)  # the invoke's only statement
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            everything = model.lm_head.output.save()
    return everything


def test_skip_in_an_invoke_without_checkpoints_keeps_to_its_rows(gpt2):
    # Its lane runs whole as it starts (no checkpoint to wait at): the skip still takes
    # only that invoke's rows (it used to take the whole batch's).
    mlp = gpt2._module.transformer.h[0].mlp
    value = torch.full((1, 4, 32), 0.25)

    def rows_0(mod, args, out):
        out = out.clone()
        out[0:1] = value
        return out

    want = _batched(gpt2._module, torch.cat([A, B]), {mlp: rows_0}).logits
    assert torch.equal(_skip_only(gpt2, A, B, value), want)
