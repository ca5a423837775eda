"""Remote blocks without a server: the wire format, CONFIG, and what the client
refuses (or routes) before any request is made."""

from __future__ import annotations

import math
import pickle
import struct

import pytest
import torch

from compiler import intervene
from runtime import CONFIG, LanguageModel
from runtime.config import DEFAULT_HOST, Config
from runtime.models import tiny_llama
from runtime.remote import client as remote_client
from runtime.remote import protocol
from runtime.remote.protocol import ProtocolError, UnsendableError
from runtime.serve.execute import ModelGuard


def roundtrip(values: dict) -> dict:
    trees, tensors = protocol.encode_values(values)
    header, got = protocol.unpack(protocol.pack({"values": trees}, tensors))
    return protocol.decode_values(header["values"], got)


def test_values_roundtrip_exactly():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    values = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "ids": torch.tensor([[1, 2, 3]]),
        "mask": torch.tensor([True, False]),
        "view": base[1:, ::2],  # a strided view of a bigger storage
        "scalar": torch.tensor(2.5),
        "nested": {"a": [1, 2.5, "x", None, True], 3: (4, (5,)), "t": base},
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "slice": slice(1, None, 2),
        "nan": math.nan,
        "inf": -math.inf,
    }
    got = roundtrip(values)
    for name in ("f32", "bf16", "ids", "mask", "view", "scalar"):
        assert got[name].dtype == values[name].dtype
        assert torch.equal(got[name], values[name]), name
    assert got["nested"]["a"] == [1, 2.5, "x", None, True]
    assert got["nested"][3] == (4, (5,))
    assert torch.equal(got["nested"]["t"], base)
    assert got["size"] == torch.Size([2, 3]) and isinstance(got["size"], torch.Size)
    assert got["dtype"] is torch.float16
    assert got["slice"] == slice(1, None, 2)
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf


def test_same_tensor_twice_stays_one_object_and_grads_travel():
    t = torch.randn(3, requires_grad=True)
    t.grad = torch.ones(3)
    got = roundtrip({"a": t, "b": [t]})
    assert got["a"] is got["b"][0]
    assert got["a"].requires_grad and torch.equal(got["a"].grad, torch.ones(3))


@pytest.mark.parametrize("value, what", [
    (lambda x: x, "a function"),
    (object(), "an object"),
    ({1, 2}, "a set"),
])
def test_unsendable_values_name_the_variable(value, what):
    with pytest.raises(UnsendableError, match=rf"variable `v`\[1\] is {what}: a remote block "
                       "can send and return tensors, numbers"):
        protocol.encode_values({"v": [0, value]})


def test_fake_tensors_are_refused():
    with pytest.raises(UnsendableError, match="tensor without data"):
        protocol.encode_values({"v": torch.empty(2, device="meta")})


def test_bad_messages_are_protocol_errors_never_unpickled():
    with pytest.raises(ProtocolError, match="bad magic"):
        protocol.unpack(pickle.dumps({"x": 1}))
    head = b'{"values": {}}'
    # A pickle where safetensors data should be: refused, not loaded.
    blob = pickle.dumps(torch.ones(2))
    with pytest.raises(ProtocolError, match="bad tensor data"):
        protocol.unpack(protocol.MAGIC + struct.pack("<Q", len(head)) + head + blob)
    with pytest.raises(ProtocolError, match="cut short"):
        protocol.unpack(protocol.MAGIC + struct.pack("<Q", 999) + head)
    with pytest.raises(ProtocolError, match="unknown value tag 'pickle'"):
        protocol.decode({"t": "pickle", "v": "..."}, {})
    with pytest.raises(ProtocolError, match="missing tensor"):
        protocol.decode({"t": "tensor", "k": "7"}, {})


def test_config_defaults_env_and_setters(monkeypatch):
    cfg = Config()
    monkeypatch.delenv("INTERVENE_HOST", raising=False)
    monkeypatch.delenv("INTERVENE_API_KEY", raising=False)
    assert cfg.host == DEFAULT_HOST == "http://127.0.0.1:8765" and cfg.api_key is None
    monkeypatch.setenv("INTERVENE_HOST", "http://10.0.0.1:9000/")
    monkeypatch.setenv("INTERVENE_API_KEY", "from-env")
    assert cfg.host == "http://10.0.0.1:9000" and cfg.api_key == "from-env"
    cfg.set_default_host("https://example.org")
    cfg.set_default_api_key("k1")
    assert cfg.host == "https://example.org" and cfg.api_key == "k1"
    with pytest.raises(ValueError, match="starting with http"):
        cfg.set_default_host("example.org:80")
    assert isinstance(CONFIG, Config)


def test_block_free_names_are_on_the_plan():
    @intervene
    def f(model, x, scale, unused):
        outs = []
        with model.trace(x, remote=True) as tracer:  # noqa: F841 - the tracer is not used
            h = model.model.layers[0].output * scale
            outs.append(h.save())
            y = torch.relu(h)
            print(len(outs), y.shape)
        return outs

    block = f.plan.functions[0].blocks[0]
    names = dict(block.free)
    assert set(names) == {"model", "x", "scale", "outs", "torch", "print", "len"}
    assert names["scale"] == block.line + 1 and names["print"] == block.line + 4
    assert block.end_line == block.line + 4


@pytest.fixture
def tiny_named():
    lm = LanguageModel(tiny_llama(0))
    lm._module.config._name_or_path = "tiny-llama"
    return lm


class _NoHTTP:
    """Stands for the HTTP client: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a request was made ({name})")


@pytest.fixture
def no_http(monkeypatch):
    monkeypatch.setattr(remote_client.Client, "http_override", _NoHTTP())


def test_unsendable_free_variable_fails_before_any_request(tiny_named, no_http):
    helper = object()

    @intervene
    def f(model, x):
        with model.trace(x, remote=True):
            h = model.model.layers[0].output.save()
            z = helper  # noqa: F841 - reading it is the point
        return h

    with pytest.raises(UnsendableError) as info:
        f(tiny_named, torch.tensor([[1, 2, 3]]))
    line = f.plan.functions[0].blocks[0].line
    assert f"line {line}: the remote block cannot send variable `helper` (read at line " \
        f"{line + 2}) is an object" in str(info.value)


def test_remote_true_is_never_silently_local(tiny_named, monkeypatch):
    monkeypatch.setattr(remote_client.Client, "http_override", None)
    CONFIG.set_default_host("http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        @intervene
        def f(model, x):
            with model.trace(x, remote=True):
                h = model.model.layers[0].output.save()
            return h

        with pytest.raises(ConnectionError, match="cannot reach the intervene server at "
                           "http://127.0.0.1:9"):
            f(tiny_named, torch.tensor([[1, 2, 3]]))
    finally:
        CONFIG.set_default_host(None)


def test_remote_block_needs_a_plain_model_variable(tiny_named, no_http):
    class Holder:
        pass

    holder = Holder()
    holder.lm = tiny_named

    @intervene
    def f(h, x):
        with h.lm.trace(x, remote=True):
            out = h.lm.model.layers[0].output.save()
        return out

    with pytest.raises(remote_client.RemoteError, match="a remote block must trace a model "
                       "held in a plain variable .* not `h.lm`"):
        f(holder, torch.tensor([[1, 2]]))


def test_model_guard_sees_every_change():
    model = tiny_llama(0)
    guard = ModelGuard(model)
    assert guard.changes() == []
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    # Spelled as a block writes them (runtime/paths.py): rooted at `model`, list indices
    # in brackets, a parameter as its module's path and its name.
    assert guard.changes() == ["parameter `model.lm_head.weight` was modified in place"]
    guard = ModelGuard(model)
    model.model.layers[0].train()
    assert guard.changes()[0] == "module `model.model.layers[0]` was switched to training mode"
    model.eval()
    guard = ModelGuard(model)
    model.model.rotary_emb.inv_freq.add_(0)
    assert guard.changes() == ["buffer `model.model.rotary_emb.inv_freq` was modified in place"]
    guard = ModelGuard(model)
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(64, 32, bias=False)
    assert guard.changes()[:2] == [
        "parameter `model.model.layers[1].mlp.down_proj.weight` was replaced or removed",
        "module `model.model.layers[1].mlp.down_proj` was added or replaced"]
    model = tiny_llama(0)
    guard = ModelGuard(model)
    model.train()
    assert guard.changes()[0] == "module `model` was switched to training mode"
    model.eval()
    guard = ModelGuard(model)
    model.model.norm.weight.grad = torch.ones(32)
    assert guard.changes() == ["parameter `model.model.norm.weight` was left with a .grad"]
    model.model.norm.weight.grad = None
    handle = model.model.norm.register_forward_hook(lambda *a: None)
    assert guard.changes() == ["module `model.model.norm` was left with hooks or a wrapped forward"]
    handle.remove()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert guard.changes() == ["parameter `model.lm_head.weight` was replaced or removed"]


class _Tty:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_status_line_only_on_a_terminal():
    tty = _Tty()
    line = remote_client._StatusLine(tty)
    line.show({"status": "QUEUED", "position": 3})
    assert "intervene: job queued (position 3)" in tty.text
    line.show({"status": "RUNNING", "elapsed": 2.25})
    assert tty.text.rsplit("\r", 1)[-1].startswith("intervene: job running (2.2 s)")
    line.clear()
    assert tty.text.endswith("\r") and not line.shown
    pipe = _Tty()
    pipe.isatty = lambda: False
    quiet = remote_client._StatusLine(pipe)
    quiet.show({"status": "QUEUED", "position": 1})
    quiet.clear()
    assert pipe.text == ""


def test_a_plain_module_has_no_name_a_server_knows(no_http):
    from runtime import NNsight
    from runtime.models import tiny_mlp

    @intervene
    def f(model, x):
        with model.trace(x, remote=True):
            out = model.head.output.save()
        return out

    with pytest.raises(remote_client.RemoteError, match="NNsight has no name a server could "
                       "know it by"):
        f(NNsight(tiny_mlp()), torch.randn(2, 8))


def test_server_refuses_a_public_address_without_keys(tmp_path, capsys):
    from runtime.serve.__main__ import is_loopback, main

    assert main(["--model", "tiny-llama", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.1.2.3") and not is_loopback("example.org")
    empty = tmp_path / "keys"
    empty.write_text("\n# no keys\n")
    with pytest.raises(SystemExit, match="holds no API key"):
        main(["--model", "tiny-llama", "--api-keys", str(empty)])


def test_worker_fails_a_job_that_changed_the_model_and_stops(monkeypatch):
    # The allowlist keeps weights out of reach; this checks the guard behind it by
    # switching the allowlist off for one in-process worker.
    import json
    import multiprocessing
    import threading

    from runtime.serve import execute, worker

    monkeypatch.setattr(execute, "validate", lambda *a: None)
    ours, theirs = multiprocessing.Pipe()
    ended = []

    def run():
        try:
            worker.main(theirs, "tiny-llama", 2**20, 4096)
        except SystemExit as exc:
            ended.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ours.poll(60) and ours.recv_bytes()[:1] == b"Y"
    source = '''def job(model, x):
    with model.trace(x):
        w = model.model.norm.weight.mul_(2)
'''
    trees, tensors = protocol.encode_values({"x": torch.tensor([[1, 2, 3]])})
    ours.send_bytes(protocol.pack({"protocol": 1, "model": "tiny-llama", "function": "job",
                                   "source": source, "filename": "job.py", "first_line": 1,
                                   "block": 0, "values": trees}, tensors))
    assert ours.poll(60)
    reply = ours.recv_bytes()
    assert reply[:1] == b"E"
    message = json.loads(reply[1:])["message"]
    assert message.startswith("the job changed the served model (parameter `model.model.norm.weight` "
                              "was modified in place)")
    assert "being reloaded for the next job" in message
    thread.join(10)
    assert ended == [3]  # the worker ends; the engine starts a fresh one
