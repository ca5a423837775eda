"""Remote blocks that call @intervene helpers (shipped as source, validated and compiled by
the server), the compiler version check, and `.source` in remote blocks (issue 11).

The app runs in-process over a real worker process serving the tiny Llama (as in
test_remote_app); each remote result is compared with the same function run locally."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from serve_support import (
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
    running,
    tiny_lm,
)

from compiler import intervene
from compiler.validate import HelperSource, ValidationError, module_names_of, validate_block
from compiler.version import compiler_version
from runtime.remote import client as remote_client
from runtime.remote import protocol
from runtime.serve import Engine, Limits

IDS = torch.tensor([[1, 5, 7, 9, 11]])
LAYER = 1  # a module constant read by a helper (sent with it)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(["tiny-llama"], Limits(job_timeout=20.0, max_result=2**22, max_print=4096))
    with running(eng):
        yield eng


def same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


# -- helpers of this file ----------------------------------------------------------------------


@intervene
def hidden_of(model, k, scale=1.0):
    """Reads a module value; a default sent as a value."""
    return model.model.layers[k].output * scale


@intervene
def boost(model, factor):
    """Writes a module value through another helper, at a module constant's layer."""
    h = hidden_of(model, LAYER)
    model.model.layers[LAYER].output[:] = h * factor + torch.ones(1)
    return h.sum()


@intervene
def mlp_norm(layer):
    """Given a submodule (an envoy) by the block."""
    return layer.mlp.output.norm(dim=-1)


@intervene
def halve(x):
    """A compiled function that reads no module value."""
    return x / 2


@intervene
def uses_helpers(model, x, remote_flag):
    with model.trace(x, remote=remote_flag):
        n = mlp_norm(model.model.layers[0]).save()
        a = hidden_of(model, 0).save()
        b = hidden_of(model, 0, scale=2.0).save()
        total = boost(model, 0.5).save()
        half = halve(model.lm_head.output).save()
    return a, b, total, n, half


def test_helpers_of_the_same_file_equal_the_local_run(remote, lm):
    local = uses_helpers(lm, IDS, False)
    got = uses_helpers(lm, IDS, True)
    same(got, local)
    assert torch.equal(local[1], local[0] * 2.0)


def test_the_job_carries_the_helpers_source_and_values(lm, monkeypatch):
    sent = []

    def capture(self, data, filename="<remote>", line=0):
        sent.append(data)
        raise RuntimeError("captured")

    monkeypatch.setattr(remote_client.Client, "run", capture)
    with pytest.raises(RuntimeError, match="captured"):
        uses_helpers(lm, IDS, True)
    header, tensors = protocol.unpack(sent[0])
    helpers = header["helpers"]
    assert sorted(helpers) == ["boost", "halve", "hidden_of", "mlp_norm"]
    assert sorted(header["values"]) == ["remote_flag", "x"]  # the helpers are not values
    assert helpers["hidden_of"]["source"].lstrip().startswith("@intervene\ndef hidden_of(")
    assert helpers["hidden_of"]["filename"] == __file__
    assert protocol.decode(helpers["hidden_of"]["defaults"], tensors) == (1.0,)
    assert protocol.decode_values(helpers["boost"]["values"], tensors) == {"LAYER": 1}


scaled_out = None  # an imported helper: set by the test below, before it decorates its block


def test_a_helper_imported_from_another_file_and_a_closure(remote, lm, tmp_path, monkeypatch):
    (tmp_path / "remote_helpers_mod.py").write_text(textwrap.dedent("""
        from compiler import intervene

        SCALE = 3.0

        @intervene
        def scaled_out(model):
            return model.model.norm.output * SCALE
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("remote_helpers_mod")
    finally:
        sys.path.remove(str(tmp_path))
    monkeypatch.setitem(globals(), "scaled_out", mod.scaled_out)  # `from ... import`
    offset = torch.arange(32.0)

    @intervene
    def shifted(model):
        return model.model.layers[0].output + offset  # a closure variable, sent

    @intervene
    def run(model, x, remote_flag):
        with model.trace(x, remote=remote_flag):
            b = shifted(model).save()
            a = scaled_out(model).save()
        return a, b

    same(run(lm, IDS, True), run(lm, IDS, False))
    sys.modules.pop("remote_helpers_mod", None)


def test_a_helper_in_a_generate_block_and_in_a_loop(remote, lm):
    @intervene
    def gen(model, x, remote_flag):
        outs = []
        with model.generate(x, max_new_tokens=3, do_sample=False, remote=remote_flag) as tracer:
            with tracer.iter[0:3]:
                outs.append(hidden_of(model, 1)[:, -1])
            tokens = model.generator.output.save()
        return tokens, outs

    local, got = gen(lm, IDS, False), gen(lm, IDS, True)
    assert torch.equal(got[0], local[0])
    assert len(got[1]) == len(local[1]) == 3
    for a, b in zip(got[1], local[1]):
        assert torch.equal(a, b)


def test_an_error_inside_a_helper_keeps_its_type(remote, lm):
    @intervene
    def bad(model):
        return model.model.layers[0].output[0, 99]

    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            v = bad(model).save()
        return v

    with pytest.raises(IndexError, match="out of bounds"):
        run(lm, IDS)


# -- refused helpers ------------------------------------------------------------------------------


def test_a_helper_reaching_a_weight_is_refused_at_its_line(remote, lm):
    @intervene
    def weights(model):
        h = model.lm_head.output
        return h @ model.lm_head.weight

    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            w = weights(model).save()
        return w

    line = weights.plan.functions[0].line + 2
    with pytest.raises(ValidationError, match=rf"line {line}: `weight`: .*cannot be reached "
                                              r".*\(in the helper `weights`, .*test_remote_"
                                              r"helpers\.py\)") as info:
        run(lm, IDS)
    assert info.value.line == line and info.value.construct == "weight"


def test_a_helper_given_a_module_cannot_treat_it_as_a_value(remote, lm):
    @intervene
    def to_half(x):
        return x.half()

    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            y = to_half(model.model.layers[0]).save()
        return y

    with pytest.raises(ValidationError, match=r"`half`: .*\(in the helper `to_half`"):
        run(lm, IDS)


# the allowlist's rules for helpers, without a server ---------------------------------------------

BLOCK = '''def job(model, x):
    with model.trace(x):
        y = helper(model, x).save()
'''
NAMES = module_names_of(tiny_lm()._module)


def check(helper_source: str, block: str = BLOCK, free=("x",), **extra) -> None:
    spec = HelperSource(textwrap.dedent(helper_source), 10, "helpers.py", frozenset(extra))
    validate_block(block, 0, free_names=free, module_names=NAMES,
                   helpers={"helper": spec})


def test_validator_accepts_reads_writes_and_torch_in_helpers():
    check('''
        def helper(model, x):
            h = model.model.layers[0].output
            model.model.layers[1].output[:] = h * 2
            for layer in model.model.layers:
                h = h + layer.output.mean()
            return torch.relu(h) + math.pi
    ''')


@pytest.mark.parametrize(("source", "construct", "reason"), [
    ("def helper(model, x):\n    return open('/etc/passwd')\n", "open", "is not allowed"),
    ("def helper(model, x):\n    import os\n", "import os", "imports are not allowed"),
    ("def helper(model, x):\n    return model.model.layers[0]\n", "model.model.layers[0]",
     "returns values, not modules"),
    ("def helper(model, x):\n    return x.__class__\n", "__class__", "starting with `_`"),
    ("def helper(model, x):\n    return torch.load(x)\n", "torch.load", "not allowed"),
    ("def helper(model, x):\n    return model.lm_head.weight\n", "weight", "cannot be reached"),
    ("def helper(model, x):\n    return secret\n", "secret", "is not defined"),
    ("def helper(model, x):\n    def inner():\n        pass\n", "def inner",
     "function definitions"),
    ("def helper(model, len):\n    return 1\n", "len", "provided by the server"),
])
def test_validator_refuses_in_helpers_with_line_and_construct(source, construct, reason):
    with pytest.raises(ValidationError) as info:
        check(source)
    err = info.value
    assert err.construct == construct and reason in err.reason
    assert err.filename == "helpers.py" and err.line >= 10
    assert "(in the helper `helper`, helpers.py)" in str(err)


def test_validator_refuses_a_helper_used_as_a_value_and_a_helper_with_a_block():
    block = '''def job(model, x):
    with model.trace(x):
        f = helper
'''
    with pytest.raises(ValidationError, match="`helper`: an @intervene helper can only be "
                                              "called"):
        check("def helper(model, x):\n    return x\n", block)
    with pytest.raises(ValidationError, match="cannot have a block of its own"):
        check("def helper(model, x):\n    with model.trace(x):\n        pass\n")


def test_validator_follows_modules_through_helpers_calling_helpers():
    block = '''def job(model, x):
    with model.trace(x):
        y = helper(model.model.layers[0], x).save()
'''
    # `m` gets a module from the block; `inner`'s `layer` gets it from `helper`
    validate_block(block, 0, free_names=("x",), module_names=NAMES, helpers={
        "helper": HelperSource("def helper(m, x):\n    return inner(m) + x\n", 1, "h.py"),
        "inner": HelperSource("def inner(layer):\n    return layer.mlp.output\n", 1, "h.py"),
    })
    with pytest.raises(ValidationError, match=r"`bias`.*\(in the helper `inner`, h\.py\)"):
        validate_block(block, 0, free_names=("x",), module_names=NAMES, helpers={
            "helper": HelperSource("def helper(m, x):\n    return inner(m)\n", 1, "h.py"),
            "inner": HelperSource("def inner(layer):\n    return layer.mlp.bias\n", 1, "h.py"),
        })
    # a helper cannot hide a module in a container, nor return one
    with pytest.raises(ValidationError, match="a module of the model can only be navigated"):
        validate_block(block, 0, free_names=("x",), module_names=NAMES, helpers={
            "helper": HelperSource("def helper(m, x):\n    x.append(m)\n", 1, "h.py")})
    with pytest.raises(ValidationError, match=r"`\[m\]`: a helper called from a remote block "
                                              "returns values, not modules"):
        validate_block(block, 0, free_names=("x",), module_names=NAMES, helpers={
            "helper": HelperSource("def helper(m, x):\n    return [m]\n", 1, "h.py")})


# -- the compiler version ------------------------------------------------------------------------


def test_env_reports_the_compiler_version(http):
    env = http.get("/v1/env").json()
    assert env["compiler"] == compiler_version() and env["protocol"] == protocol.PROTOCOL_VERSION


def test_a_job_from_another_compiler_version_is_refused_before_it_runs(remote, lm, monkeypatch,
                                                                       engine):
    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            h = model.model.layers[0].output.save()
        return h

    before = len(engine.jobs)
    ours = compiler_version()
    monkeypatch.setattr(remote_client, "compiler_version", lambda: "0.0.1")
    with pytest.raises(remote_client.RemoteError) as info:
        run(lm, IDS)
    assert str(info.value) == (
        f"VersionError: the client's intervene compiler is version 0.0.1 and this server's is "
        f"version {ours}: the server recompiles every block with its own compiler, so both must "
        f"be the same version; install intervene {ours} on the client (`pip install "
        f"intervene=={ours}`), or ask the server's operator to run the client's version")
    assert info.value.type_name == "VersionError"
    assert len(engine.jobs) == before  # refused at submission: nothing queued, nothing ran


def test_a_job_without_a_compiler_version_is_refused(http):
    head = {"protocol": protocol.PROTOCOL_VERSION, "model": "tiny-llama", "function": "job",
            "source": BLOCK, "filename": "job.py", "first_line": 1, "block": 0, "values": {}}
    resp = http.post("/v1/jobs", content=protocol.pack(head))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "VersionError"
    assert error["message"].startswith("the client's intervene compiler is an unknown version "
                                       f"and this server's is version {compiler_version()}")


# -- .source in remote blocks --------------------------------------------------------------------


def test_source_in_a_remote_block_is_refused_with_a_clear_message(remote, lm):
    @intervene
    def run(model, x):
        with model.trace(x, remote=True):
            a = model.model.layers[0].self_attn.source.self_o_proj_0.output.save()
        return a

    line = run.plan.functions[0].blocks[0].line + 1
    with pytest.raises(ValidationError, match=rf"line {line}: `source`: `.source` \(a module's "
                                              r"forward operations\) is not available in "
                                              r"remote blocks yet") as info:
        run(lm, IDS)
    assert info.value.construct == "source"


# -- hostile helpers in hand-made job messages ---------------------------------------------------

RAW_BLOCK = '''def job(model, x):
    with model.trace(x, remote=True):
        y = helper(model).save()
'''


def raw_job(http, helper_source: str, **helper):
    entry = {"source": helper_source, "filename": "evil.py", "first_line": 1, "values": {},
             **helper}
    trees, tensors = protocol.encode_values({"x": IDS})
    head = {"protocol": protocol.PROTOCOL_VERSION, "compiler": compiler_version(),
            "model": "tiny-llama", "function": "job", "source": RAW_BLOCK,
            "filename": "job.py", "first_line": 1, "block": 0, "values": trees,
            "helpers": {"helper": entry}}
    resp = http.post("/v1/jobs", content=protocol.pack(head, tensors))
    if resp.status_code != 202:
        return resp.status_code, resp.json()["error"]
    job = resp.json()["id"]
    http.get(f"/v1/jobs/{job}/events")  # ends with the job
    return 202, http.get(f"/v1/jobs/{job}").json()


def test_a_helpers_decorators_defaults_and_annotations_never_run_on_the_server(http, tmp_path):
    marks = [tmp_path / n for n in ("decorator", "default", "annotation")]
    source = (f"@open({str(marks[0])!r}, 'w').close\n"
              f"def helper(model, k=open({str(marks[1])!r}, 'w')) -> open({str(marks[2])!r}, 'w'):\n"
              "    return model.model.layers[0].output\n")
    code, status = raw_job(http, source, defaults={"t": "tuple", "v": [3]})  # k=3, sent
    assert code == 202 and status["status"] == "COMPLETED", status
    assert not any(m.exists() for m in marks)
    code, status = raw_job(http, source)  # no defaults sent: k has none there
    assert status["error"]["message"] == "helper() missing 1 required positional argument: 'k'"


@pytest.mark.parametrize(("source", "extra", "message"), [
    ("def helper(model):\n    return model.model.layers[0].output\nclass A:\n    pass\n", {},
     "exactly one function definition"),
    ("def helper(model):\n    return model.__class__\n", {}, "starting with `_`"),
    ("def helper(model):\n    return getattr(model, 'lm_head')\n", {}, "`getattr` is not allowed"),
    ("def helper(model):\n    return model.model.layers[0].output\n", {"values": {"1x": 1}},
     "not a plain variable name"),
])
def test_hostile_helpers_are_refused_before_running(http, source, extra, message):
    code, status = raw_job(http, source, **extra)
    error = status if code != 202 else status["error"]
    assert status.get("status", "ERROR") == "ERROR" and message in error["message"], status


def test_malformed_helpers_are_refused_at_submission(http):
    code, error = raw_job(http, "def helper(model):\n    pass\n", first_line=0)
    assert code == 400 and error["type"] == "ProtocolError"
    assert "has no source, file, first line or values" in error["message"]
    code, error = raw_job(http, "x" * (65 * 1024))
    assert code == 400 and "and the helpers it calls" in error["message"]
