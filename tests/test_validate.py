"""The server's allowlist check of remote blocks (compiler/validate.py).

Allowed: every block of the samples and the README's kinds of blocks (saves, in-place
edits, invokes and barriers, generation with step blocks, backward blocks, cache, stop,
scan).  Refused: the security corpus (tests/security/corpus.py), each at its line and
construct; its runtime and server entries pass the validator (the server stops them).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from security.corpus import ENTRIES, LLAMA_MODULE_NAMES, job

from compiler.codegen import compile_source
from compiler.parse import functions_in_file
from compiler.validate import (
    MAX_DEPTH,
    ValidationError,
    module_names_of,
    validate_block,
)

ROOT = Path(__file__).resolve().parent.parent
REFUSED = [e for e in ENTRIES if e["category"] == "refused"]
ACCEPTED = [e for e in ENTRIES if e["category"] != "refused"]


def check(source: str, block: int = 0, free=("prompt",), **kw) -> None:
    validate_block(source, block, free_names=set(free), module_names=LLAMA_MODULE_NAMES, **kw)


def refusal(source: str, block: int = 0, free=("prompt",), **kw) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        check(source, block, free, **kw)
    return info.value


# -- the corpus ------------------------------------------------------------------------


def test_corpus_has_every_kind_of_entry():
    assert len(ENTRIES) >= 40
    assert {e["category"] for e in ENTRIES} == {"refused", "runtime", "server"}
    assert {e["expect"] for e in ENTRIES if e["category"] == "runtime"} >= {
        "timeout", "error", "result-too-large", "output-limit", "model-state"}


@pytest.mark.parametrize("entry", REFUSED, ids=[e["name"] for e in REFUSED])
def test_corpus_refused_at_its_line_and_construct(entry):
    err = refusal(entry["source"], entry["block"], entry["free"])
    want = entry["expect"]
    assert (err.line, err.construct) == (want["line"], want["construct"]), str(err)
    assert str(err).startswith(f"line {want['line']}: `{want['construct']}`: ")
    assert err.reason and err.reason in str(err)


@pytest.mark.parametrize("entry", ACCEPTED, ids=[e["name"] for e in ACCEPTED])
def test_corpus_runtime_and_server_entries_pass_the_validator(entry):
    check(entry["source"], entry["block"], entry["free"])


# -- messages --------------------------------------------------------------------------


def test_message_names_line_construct_and_reason():
    src = job("h = model.lm_head.output\nname = h.__class__")
    err = refusal(src)
    assert str(err) == ("line 5: `__class__`: attributes starting with `_` are not allowed "
                        "in remote blocks")
    assert (err.line, err.col, err.construct) == (5, 17, "__class__")


def test_lines_are_the_users_when_the_first_line_is_given():
    src = job("x = 1\nimport os")
    assert refusal(src).line == 5
    assert refusal(src, first_line=40).line == 44


@pytest.mark.parametrize(("body", "construct", "words"), [
    ("w = model.lm_head.weight", "weight", "parameters, buffers"),
    ("x = torch.load('w.pt')", "torch.load", "not allowed"),
    ("x = model.model.layers[0].foo", "foo", "not a module of the served model"),
    ("s = '{}'.format(prompt)", "format", "use an f-string"),
    ("x = model.lm_head.output.register_hook", "register_hook", "not an allowed method"),
    ("x = secret", "secret", "not sent with the job"),
    ("m = [model.lm_head][0].output", None, None),  # a list of envoys indexes to an envoy
    ("d = {1: model.lm_head}", "model.lm_head", "can only be navigated"),
    ("x = tracer.plan", "plan", "tracer attribute"),
    ("x = torch", "torch", "cannot be used as a value"),
])
def test_each_refusal_says_why(body, construct, words):
    src = job(body)
    if construct is None:
        check(src)
        return
    err = refusal(src)
    assert err.construct == construct
    assert words in str(err)


def test_an_unsaved_variable_read_after_the_block_is_the_compilers_error():
    src = ("@intervene\ndef job(model, prompt):\n    with model.trace(prompt, remote=True):\n"
           "        h = model.lm_head.output\n    return h\n")
    err = refusal(src)
    assert err.construct == "compile error"
    assert "without being saved" in str(err) and err.line == 5


# -- what passes ------------------------------------------------------------------------

ALLOWED = {
    "save_and_edit": """
        hidden = model.model.layers[5].output.save()
        model.model.layers[5].output[:, -1, :] = 0
        model.model.layers[3].output[:, -1] *= 0.9
        model.model.layers[4].output.mul_(2)
        model.model.layers[6].output = model.model.layers[6].output + 1
        model.model.embed_tokens.input = model.model.embed_tokens.input
        args, kwargs = model.model.layers[7].inputs
        logits = model.lm_head.output.save()
        top = logits[0, -1].softmax(-1).topk(3).indices.tolist()
        print(f"top {top!r}: {logits.shape} {math.sqrt(2):.2f}")
    """,
    "loops_and_comprehensions": """
        norms = [layer.output.norm(dim=-1) for layer in model.model.layers].save()
        for i, layer in enumerate(model.model.layers[:4]):
            if i % 2 == 0:
                layer.output[:] = torch.nn.functional.normalize(layer.output, dim=-1)
        for layer, scale in zip(model.model.layers, scales):
            layer.output *= scale
            total = scale * 2
        hs = {k: v for k, v in enumerate(norms)}
        n = len(model.model.layers)
        mods = list(model.model.layers)
        last = mods[-1].mlp.down_proj.output.save()
    """,
    "values_and_builtins": """
        x = model.lm_head.output[0, -1]
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            y = (x + noise).float().clamp(min=-1.0, max=1.0).save()
        d = {"a": 1}
        d.update(b=2)
        keys = sorted(d.keys())
        ok = isinstance(x, torch.Tensor) and x.dtype == torch.float32
        eps = torch.finfo(x.dtype).eps
        try:
            z = 1 / 0
        except ZeroDivisionError as err:
            z = None
        assert ok, "not a tensor"
        del d
        while n > 0:
            n -= 1
    """,
}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_blocks_pass(name):
    check(job(ALLOWED[name]), free=("prompt", "scales", "n"))


def test_invokes_barriers_stop_and_cache_pass():
    check(job("""
        cache = tracer.cache(modules=[layer for layer in model.model.layers])
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            h = model.model.layers[3].output[:, -1, :]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            model.model.layers[3].output[:, -1, :] = h
            outs.append(model.lm_head.output[:, -1].save())  # a list sent by the client
        with tracer.invoke():
            tracer.stop()
    """, header="model.trace() as tracer", params="model, clean, corrupt, outs"),
        free=("clean", "corrupt", "outs"))


def test_generation_with_step_blocks_passes():
    check(job("""
        hs = list().save()
        with tracer.all():
            model.model.layers[2].output[:] *= 0.9
            hs.append(model.model.layers[-1].output.save())
        with tracer.iter[2:5]:
            model.model.layers[2].output[:] = 0
        for step in tracer.iter[[0, 2]]:
            print(step)
        out = model.generator.output.save()
        result = tracer.result
    """, header="model.generate(prompt, max_new_tokens=n, do_sample=False, remote=True) "
                "as tracer", params="model, prompt, n"), free=("prompt", "n"))


def test_backward_blocks_pass():
    check(job("""
        hidden = model.model.layers[-1].output
        hidden.requires_grad = True
        loss = model.lm_head.output[0, -1, target].sum()
        with loss.backward(retain_graph=True):
            grad = hidden.grad.save()
            hidden.grad[:, :-1] = 0
        x = model.model.layers[0].output
        x.retain_grad()
    """, params="model, prompt, target"), free=("prompt", "target"))


def test_scan_and_a_trace_with_no_grad_items_pass():
    check(job("shape = model.model.layers[0].output.shape.save()",
              header="model.scan(prompt)"))
    check(job("h = model.lm_head.output.save()",
              header="torch.no_grad(), model.trace(prompt, remote=True) as tracer"))
    refusal(job("h = model.lm_head.output.save()",
                header="torch.hub.load('a', 'b'), model.trace(prompt) as tracer"))


def _sample_blocks():
    for path in sorted((ROOT / "samples").glob("*.py")):
        for src in functions_in_file(str(path)):
            plan = compile_source(src).plan
            for block in plan.blocks:
                yield pytest.param(src, block, id=f"{path.stem}.{plan.name}.{block.index}")


@pytest.mark.parametrize(("src", "block"), list(_sample_blocks()))
def test_every_sample_block_passes(src, block):
    free = {name for name, _ in block.free}
    validate_block(src.text, block.index, free_names=free, module_names=LLAMA_MODULE_NAMES,
                   first_line=src.first_line)


def _blocks_in(sources):
    for label, src in sources:
        plan = compile_source(src).plan
        for block in plan.blocks:
            if block.model == "(helper)":
                continue  # a helper's body runs in its caller's block, never on its own
            yield pytest.param(src, block, id=f"{label}.{plan.name}.{block.index}")


def _readme_and_corpus_blocks():
    import re

    readme = (ROOT / "README.md").read_text()
    snippets = [c for c in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "@intervene" in c]
    sources = [("README", s) for c in snippets for s in functions_in_file("README.md", c)]
    sources += [(p.stem, s) for p in sorted((ROOT / "tests" / "corpus").glob("*.py"))
                for s in functions_in_file(str(p))]
    return list(_blocks_in(sources))


# Blocks of the compiler's corpus that are refused remotely by design: function -> why.
REMOTE_REFUSED = {"run": "must be a plain name",  # methods.py: `self.model.trace(...)`
                  "head_off": r"`\.source` \(a module's forward operations\) is not available"}


@pytest.mark.parametrize(("src", "block"), _readme_and_corpus_blocks())
def test_every_readme_and_compiler_corpus_block_passes(src, block):
    """The compiler's corpus runs on small models of other shapes: no module names given.
    A new corpus block refused on purpose goes into REMOTE_REFUSED with the reason."""
    free = {name for name, _ in block.free}
    name = compile_source(src).plan.name
    if name in REMOTE_REFUSED and (block.model != "model" or name != "run"):
        with pytest.raises(ValidationError, match=REMOTE_REFUSED[name]):
            validate_block(src.text, block.index, free_names=free)
        return
    validate_block(src.text, block.index, free_names=free, first_line=src.first_line)


# -- kinds of values: envoys never pass for tensors ---------------------------------------


@pytest.mark.parametrize(("body", "construct"), [
    ("for layer in model.model.layers:\n    layer.half()", "half"),
    ("for i, layer in enumerate(model.model.layers):\n    layer.float()", "float"),
    ("mods = [m for m in model.model.layers]\nmods[0].to(torch.float16)", "to"),
    ("a, b = model.lm_head, model.model\nb.train()", "train"),
    ("m = model.lm_head if prompt else model.model\nm.cuda()", "cuda"),
    ("m = model.lm_head\nx = m + 1", "m"),
    ("print(model.lm_head)", "model.lm_head"),
    ("xs = [model.lm_head]\nys = xs.copy()", "copy"),
    ("(m := model.lm_head).eval()", "eval"),
])
def test_a_variable_that_may_hold_a_module_is_a_module(body, construct):
    assert refusal(job(body)).construct == construct


@pytest.mark.parametrize(("body", "construct"), [
    ("t = torch\nt.save(prompt, '/tmp/x')", "torch"),
    ("t = torch.nn\nf = t.functional", "torch.nn"),
    ("T = torch.Tensor\nx = T(1000)", "torch.Tensor"),
    ("xs = []\nxs.append(torch.Tensor)", "torch.Tensor"),
    ("t = tracer\nt.stop()", "tracer"),
    ("print(math)", "math"),
    ("x = torch.Tensor.add", "add"),
])
def test_namespaces_classes_and_the_tracer_cannot_be_aliased(body, construct):
    assert refusal(job(body)).construct == construct


def test_isinstance_takes_classes_and_functions_may_be_aliased():
    check(job("""
        h = model.lm_head.output
        ok = isinstance(h, torch.Tensor) or isinstance(h, (torch.Tensor, list))
        f = torch.zeros
        z = f(3)
        norms = list(map(len, [[1], [2, 3]]))
    """))


def test_generate_options_are_listed_in_invokes_too():
    src = job("""
        with tracer.invoke(prompt, custom_generate="evil/repo"):
            out = model.generator.output.save()
    """, header="model.generate(max_new_tokens=2, remote=True) as tracer")
    assert refusal(src).construct == "custom_generate"


# -- defaults, limits, speed -----------------------------------------------------------------


def test_free_names_default_to_parameters_and_variables_bound_outside():
    src = ("@intervene\ndef job(model, prompt):\n    k = 3\n"
           "    with model.trace(prompt, remote=True):\n"
           "        h = model.model.layers[k].output.save()\n"
           "        g = model.model.layers[LAYER].output.save()\n")
    err = pytest.raises(ValidationError, validate_block, src, 0,
                        module_names=LLAMA_MODULE_NAMES).value
    assert (err.line, err.construct) == (6, "LAYER")
    validate_block(src, 0, free_names={"prompt", "k", "LAYER"}, module_names=LLAMA_MODULE_NAMES)


def test_without_module_names_known_module_attributes_are_still_refused():
    src = job("h = model.model.layers[0].mlp.output.save()")
    validate_block(src, 0, free_names={"prompt"})
    for body, construct in [("model.model.to('cpu')", "to"), ("c = model.config", "config"),
                            ("model.lm_head.weight.zero_()", "weight"),
                            ("model.model.set_submodule('x', prompt)", "set_submodule"),
                            ("model.model.layers[0].register_forward_hook(print)",
                             "register_forward_hook")]:
        with pytest.raises(ValidationError) as info:
            validate_block(job(body), 0, free_names={"prompt"})
        assert info.value.construct == construct


def test_module_names_of_the_default_architecture():
    from runtime.models import tiny_llama

    assert module_names_of(tiny_llama(0)) == LLAMA_MODULE_NAMES


@pytest.mark.parametrize("expr", ["-" * 1000 + "1", "+".join(["a"] * 3000), "[" * 190 + "]" * 190,
                                  "(" * 5000 + ")" * 5000])
def test_deep_sources_are_refused_quickly(expr):
    start = time.perf_counter()
    err = refusal(job(f"x = {expr}"), free=("prompt", "a"))
    assert err.construct in ("nesting", "syntax")
    assert time.perf_counter() - start < 1.0
    assert f"{MAX_DEPTH}" in str(err) or "nested" in str(err) or "parse" in str(err)


def test_validation_is_fast():
    src = job(ALLOWED["save_and_edit"] + ALLOWED["loops_and_comprehensions"])
    check(src, free=("prompt", "scales"))  # warm
    times = []
    for _ in range(10):
        start = time.perf_counter()
        check(src, free=("prompt", "scales"))
        times.append(time.perf_counter() - start)
    assert min(times) < 0.05  # about 10 ms; the best of ten, as the machine may be busy


def test_any_source_is_accepted_or_refused_never_a_crash():
    """Random valid Python in a block: a ValidationError or nothing, quickly."""
    import textwrap

    import hypothesmith
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(hypothesmith.from_grammar(auto_target=False))
    def run(code):
        src = job("pass") + textwrap.indent(code, "        ")
        start = time.perf_counter()
        try:
            check(src)
        except ValidationError as err:
            assert err.line >= 1 and err.construct
        assert time.perf_counter() - start < 2.0

    run()


def test_a_long_chain_of_module_aliases_is_refused_not_half_checked():
    """Kinds are inferred pass by pass, one alias further each (here, backwards through
    a loop); a chain longer than the passes would leave a module looking like a tensor."""

    def chain(n):
        names = [f"x{i}" for i in range(n)]
        links = "\n".join(f"    {a} = {b}" for a, b in zip(reversed(names[1:]),
                                                         reversed(names[:-1])))
        return (f"for i in range(2):\n    {names[-1]}.to(torch.float16)\n{links}\n"
                "    x0 = model.lm_head")

    assert refusal(job(chain(5))).construct == "to"
    assert refusal(job(chain(12))).construct == "aliases"


def test_match_patterns_that_read_no_attributes_pass():
    check(job("""
        h = model.lm_head.output
        match which:
            case "late" | "last":
                x = 1
            case [first, *rest]:
                x = first
            case {"k": v, **others}:
                x = v
            case str(s) if s:
                x = s
            case int() | None:
                x = 0
            case torch.float16:
                x = 2
            case _:
                x = h.sum()
        y = x
    """), free=("prompt", "which"))
    assert refusal(job("match which:\n    case torch.load:\n        pass"),
                   free=("prompt", "which")).construct == "torch.load"
    assert refusal(job("match which:\n    case [str(), prompt.__class__]:\n        pass"),
                   free=("prompt", "which")).construct == "__class__"


@pytest.mark.parametrize("name", ["model", "torch", "len"])
def test_the_tracer_cannot_take_a_provided_name(name):
    err = refusal(job("h = 1", header=f"model.trace(prompt, remote=True) as {name}"))
    assert (err.line, err.construct) == (3, name)


def test_module_names_leave_out_names_of_module_methods():
    """`x.train` must not pass on a module that has no child of that name."""
    import torch

    net = torch.nn.Module()
    net._modules["train"] = torch.nn.Linear(1, 1)  # as a checkpoint's names could make it
    net.add_module("mlp", torch.nn.Sequential(torch.nn.Linear(1, 1)))
    assert module_names_of(net) == {"mlp"}
