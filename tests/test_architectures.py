"""The same experiments on many architectures, each built tiny from its config.

Every architecture gets: save, zero (checked against a plain forward hook), two
invokes (each equal to its own run; an edit stays in its invoke), generate (where
the model generates: tokens equal plain ``generate``, every step seen), backward
(the gradient equals ``torch.autograd.grad``), cache, scan (shapes equal the real
ones) and attention inputs (``.inputs`` equal what a pre-hook sees), plus a
left-padded batch for causal LMs.  A handful run in ``make test``; all of them
are marked ``arch_all`` and run with ``make test-arch`` (``pytest -m arch_all``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from support import assert_no_hooks

from compiler import intervene
from runtime import LanguageModel, NNsight

SMALL = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8,
}


@dataclass(frozen=True, eq=False)  # hashed by identity: one build per entry
class Arch:
    model_type: str
    kind: str = "causal"  # causal | seq2seq | encoder | vision
    overrides: dict = field(default_factory=dict)
    quick: bool = False  # also in the default run (`make test`)
    padding: bool = True  # a left-padded row equals the prompt alone
    scan_fails: str = ""  # why `model.scan` cannot run it (a known gap, xfail)
    scan_fails_tf4: str = ""  # the same, on transformers 4.x only

    def __str__(self) -> str:
        return self.model_type


# transformers 5 runs MoE experts with torch._grouped_mm on the CPU; torch's fake-tensor
# kernel for it accepts only bfloat16, so a float32 MoE model cannot be scanned.
MOE_SCAN = ("MoE experts cannot run on fake tensors (5.x: torch's fake _grouped_mm takes "
            "only bfloat16; 4.x: expert routing has data-dependent shapes)")

# transformers 4.x checks input_ids for pad tokens when there is no attention mask, and
# reads the mask's values when there is one: neither can run on fake tensors.
PADDING_CHECK = "transformers 4.x reads token or mask values, which fake tensors lack"
TF4 = __import__("transformers").__version__.startswith("4.")

ARCHS = [
    Arch("gpt2", quick=True, scan_fails_tf4=PADDING_CHECK),
    Arch("gpt_neox"),
    Arch("gptj", overrides={"rotary_dim": 4}),
    Arch("gpt_neo", overrides={"attention_types": [[["global", "local"], 1]], "window_size": 16,
                               "num_layers": 2}),
    Arch("codegen", overrides={"rotary_dim": 4}),
    Arch("llama", quick=True),
    Arch("mistral"),
    Arch("ministral"),
    Arch("qwen2", quick=True),
    Arch("qwen3"),
    Arch("gemma"),
    Arch("gemma2"),
    Arch("gemma3_text"),
    Arch("phi"),
    Arch("phi3"),
    Arch("opt", scan_fails_tf4=PADDING_CHECK),
    Arch("bloom"),
    Arch("falcon", overrides={"head_dim": None}),
    Arch("mpt"),
    Arch("gpt_bigcode"),
    Arch("stablelm"),
    Arch("starcoder2"),
    Arch("olmo"),
    Arch("olmo2"),
    Arch("cohere"),
    Arch("granite"),
    Arch("persimmon"),
    Arch("smollm3"),
    Arch("glm"),
    Arch("helium"),
    Arch("nemotron"),
    Arch("biogpt", scan_fails_tf4=PADDING_CHECK),
    Arch("xglm", scan_fails_tf4=PADDING_CHECK),
    Arch("mixtral", scan_fails=MOE_SCAN),
    Arch("qwen2_moe", scan_fails=MOE_SCAN),
    Arch("qwen3_moe", scan_fails=MOE_SCAN),
    Arch("olmoe", scan_fails=MOE_SCAN),
    Arch("granitemoe", scan_fails=MOE_SCAN),
    Arch("phimoe", scan_fails=MOE_SCAN),
    Arch("mamba"),
    Arch("mamba2", scan_fails_tf4=PADDING_CHECK,
         overrides={"num_heads": 8, "n_groups": 1, "state_size": 16, "expand": 2,
                    "chunk_size": 16}),
    Arch("falcon_mamba"),
    Arch("t5", "seq2seq", quick=True),
    Arch("bart", "seq2seq", scan_fails_tf4=PADDING_CHECK),
    Arch("bert", "encoder", quick=True, scan_fails_tf4=PADDING_CHECK),
    Arch("roberta", "encoder", scan_fails_tf4=PADDING_CHECK),
    Arch("vit", "vision"),
    Arch("resnet", "vision"),
]

CONFIGS = {
    "t5": {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
           "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0,
           "pad_token_id": 0, "eos_token_id": 1},
    "bart": {"vocab_size": 128, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
             "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
             "decoder_start_token_id": 2, "forced_eos_token_id": None},
    "bert": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64},
    "roberta": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 64,
                "max_position_embeddings": 70, "pad_token_id": 1},
    "vit": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "image_size": 16, "patch_size": 8, "num_labels": 3},
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
               "num_labels": 3},
}


def params(kinds=None):
    return [
        pytest.param(a, id=a.model_type, marks=() if a.quick else (pytest.mark.arch_all,))
        for a in ARCHS if kinds is None or a.kind in kinds
    ]


@functools.cache
def build(arch: Arch) -> Any:
    import transformers
    from transformers import AutoConfig

    settings = CONFIGS.get(arch.model_type, SMALL)
    settings = {k: v for k, v in {**settings, **arch.overrides}.items() if v is not None}
    config = AutoConfig.for_model(arch.model_type, **settings)
    auto = {
        "causal": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "encoder": transformers.AutoModel,
        "vision": transformers.AutoModelForImageClassification,
    }[arch.kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config).to(torch.float32).eval()
    return model


@pytest.fixture(params=params())
def arch(request) -> Arch:
    return request.param


@pytest.fixture
def wrapped(arch, keep_grad_mode):
    model = build(arch)
    wrapper = NNsight(model) if arch.kind == "vision" else LanguageModel(model)
    torch.set_grad_enabled(False)
    yield wrapper
    assert_no_hooks(model)
    for p in model.parameters():
        p.grad = None


A = torch.tensor([[5, 9, 17, 3, 40, 6]])
B = torch.tensor([[7, 8, 11, 12, 13, 14]])
SHORT = [7, 8, 11]
DECODER = torch.tensor([[0, 4, 6]])


def input_of(arch: Arch, ids: torch.Tensor, row: int = 0) -> Any:
    if arch.kind == "vision":
        g = torch.Generator().manual_seed(ids.sum().item())
        return torch.randn(ids.shape[0], 3, 16, 16, generator=g)
    if arch.kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": DECODER.expand(ids.shape[0], -1)}
    return ids


def call(wrapper, x) -> Any:
    """The model called by hand with what the wrapper passes it."""
    if isinstance(wrapper, LanguageModel):
        _, kwargs = wrapper._prepare((x,), {})
        return wrapper._module(**kwargs)
    return wrapper._module(x)


def first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def main(out):
    """The tensor a model's output is about."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return first(out)


def layers_of(module: torch.nn.Module, arch: Arch):
    """The first list of blocks (the decoder's for seq2seq generation)."""
    lists = [(name, m) for name, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == 2]
    if arch.kind == "seq2seq":
        lists = [item for item in lists if "decoder" in item[0]] or lists
    return lists[0]


def envoy_at(wrapper, path: str):
    env = wrapper
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def layer_envoy(wrapper, arch: Arch):
    name, _ = layers_of(wrapper._module, arch)
    return envoy_at(wrapper, name)[0]


ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention|SelfAttention|mixer)$")


def attention_envoy(wrapper, arch: Arch):
    layer = layer_envoy(wrapper, arch)
    for name, _ in layer._module.named_modules():
        if ATTENTION.search(name):
            return envoy_at(layer, name)
    return None


def captured(module: torch.nn.Module, edit=None):
    """A forward hook keeping the module's output (after ``edit`` of its first tensor)."""
    seen: dict = {}

    def hook(mod, args, out):
        if edit is not None:
            edit(first(out))
        seen["out"] = out

    return seen, module.register_forward_hook(hook)


def plain_call(wrapped, layer, x):
    """The model's output on ``x`` and ``layer``'s, by plain PyTorch (a forward hook)."""
    seen, handle = captured(layer._module)
    try:
        out = call(wrapped, x)
    finally:
        handle.remove()
    return out, seen["out"]


# --------------------------------------------------------------------------------------
# Experiments, written once for every architecture
# --------------------------------------------------------------------------------------


@intervene
def save_layer(model, layer, x):
    with model.trace(x):
        hidden = layer.output.save()
        out = model.output.save()
    return hidden, out


@intervene
def zero_layer(model, layer, x):
    with model.trace(x):
        first(layer.output)[:] = 0
        out = model.output.save()
    return out


@intervene
def two_invokes(model, layer, a, b):
    with model.trace() as tracer:
        with tracer.invoke(a):
            clean = main(model.output).save()
        with tracer.invoke(b):
            first(layer.output)[:] = 0
            edited = main(model.output).save()
    return clean, edited


@intervene
def generate_steps(model, layer, x, shapes):
    with model.generate(x, max_new_tokens=3, do_sample=False) as tracer:  # noqa: SIM117
        with tracer.all():
            shapes.append(tuple(first(layer.output).shape))
    return tracer.result


@intervene
def grad_of_layer(model, layer, x):
    with model.trace(x):
        hidden = first(layer.output)
        loss = main(model.output).sum()
        with loss.backward():
            grad = hidden.grad.save()
    return grad


@intervene
def cache_layer(model, layer, x):
    with model.trace(x) as tracer:
        cache = tracer.cache(modules=[layer])
    return cache


@intervene
def scan_layer(model, layer, x):
    with model.scan(x):
        shape = tuple(first(layer.output).shape).save()
    return shape


@intervene
def attention_inputs(model, attention, x):
    with model.trace(x):
        inputs = attention.inputs.save()
    return inputs


@intervene
def last_logits(model, x):
    with model.trace(x):
        logits = model.output.logits[:, -1].save()
    return logits


# --------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------


def test_save(arch, wrapped):
    x = input_of(arch, A)
    layer = layer_envoy(wrapped, arch)
    expected, plain = plain_call(wrapped, layer, x)
    hidden, out = save_layer(wrapped, layer, x)
    assert torch.equal(first(hidden), first(plain))
    assert torch.equal(main(out), main(expected))


def test_zero(arch, wrapped):
    x = input_of(arch, A)
    layer = layer_envoy(wrapped, arch)
    _, handle = captured(layer._module, edit=lambda t: t.zero_())
    try:
        expected = main(call(wrapped, x))
    finally:
        handle.remove()
    got = main(zero_layer(wrapped, layer, x))
    assert torch.equal(got, expected)
    assert not torch.equal(got, main(call(wrapped, x)))  # the edit changed the result


def test_invokes(arch, wrapped):
    a, b = input_of(arch, A), input_of(arch, B)
    layer = layer_envoy(wrapped, arch)
    clean, edited = two_invokes(wrapped, layer, a, b)
    _, handle = captured(layer._module, edit=lambda t: t.zero_())
    try:
        expected_edited = main(call(wrapped, b))
    finally:
        handle.remove()
    assert torch.allclose(clean, main(call(wrapped, a)), atol=1e-5)
    assert torch.allclose(edited, expected_edited, atol=1e-5)


@pytest.mark.parametrize("arch", params(("causal", "seq2seq")), indirect=True)
def test_generate(arch, wrapped):
    layer = layer_envoy(wrapped, arch)
    shapes: list = []
    tokens = generate_steps(wrapped, layer, A, shapes)
    _, kwargs = wrapped._prepare((A,), {})
    kwargs.pop("position_ids", None)
    expected = wrapped._module.generate(**kwargs, max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, expected)
    assert len(shapes) == expected.shape[1] - (A.shape[1] if arch.kind == "causal" else 1)


def test_backward(arch, wrapped):
    x = input_of(arch, A)
    layer = layer_envoy(wrapped, arch)
    torch.set_grad_enabled(True)
    grad = grad_of_layer(wrapped, layer, x)
    out, plain = plain_call(wrapped, layer, x)
    (expected,) = torch.autograd.grad(main(out).sum(), first(plain))
    assert torch.allclose(grad, expected, atol=1e-6)
    assert grad.abs().sum() > 0


def test_cache(arch, wrapped):
    x = input_of(arch, A)
    layer = layer_envoy(wrapped, arch)
    _, plain = plain_call(wrapped, layer, x)
    cache = cache_layer(wrapped, layer, x)
    assert torch.equal(first(cache[layer._path].output), first(plain))


def test_scan(arch, wrapped, request):
    reason = arch.scan_fails or (arch.scan_fails_tf4 if TF4 else "")
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    x = input_of(arch, A)
    layer = layer_envoy(wrapped, arch)
    _, plain = plain_call(wrapped, layer, x)
    assert scan_layer(wrapped, layer, x) == tuple(first(plain).shape)


def test_attention_inputs(arch, wrapped):
    attention = attention_envoy(wrapped, arch)
    if attention is None:
        pytest.skip(f"{arch} has no attention module")
    x = input_of(arch, A)
    seen = {}
    handle = attention._module.register_forward_pre_hook(
        lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    try:
        call(wrapped, x)
    finally:
        handle.remove()
    args, kwargs = attention_inputs(wrapped, attention, x)
    assert len(args) == len(seen["args"]) and kwargs.keys() == seen["kwargs"].keys()
    for got, want in zip(args, seen["args"]):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else True


@pytest.mark.parametrize("arch", params(("causal",)), indirect=True)
def test_left_padded_rows_equal_alone(arch, wrapped):
    if not arch.padding:
        pytest.skip(f"{arch}: left padding changes its values")
    batch = last_logits(wrapped, [A[0].tolist(), SHORT])
    assert torch.allclose(batch[0], last_logits(wrapped, A)[0], atol=1e-4)
    assert torch.allclose(batch[1], last_logits(wrapped, [SHORT])[0], atol=1e-4)
