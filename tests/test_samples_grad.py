"""The gradient and cache samples run and print what they promise.

Each sample is imported from its file (importing runs nothing) and its ``main()`` is
called with stdout captured; the numbers are checked against plain PyTorch where cheap.
"""

from __future__ import annotations

import re

import pytest
import torch
from support import forward_hooks, load_sample

# The samples switch autograd off for themselves: each test gets its grad mode back.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_grad_mode")]


@pytest.fixture(scope="module")
def lm():
    from runtime import LanguageModel

    return LanguageModel("smollm2-135m", dispatch=True)  # tests reach into _module


@pytest.mark.parametrize("name", ["attribution", "logit_lens"])
def test_importing_runs_nothing(name, capsys):
    module = load_sample(name)
    assert callable(module.main)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------------------

ATTR_ROW = re.compile(r"^ *(\d+) \| +([+-]\d+\.\d\d) ?([#-]*) *\| +([+-]\d+\.\d\d) ?([#-]*)$",
                      re.MULTILINE)


def test_attribution_main(capsys):
    load_sample("attribution").main()
    out = capsys.readouterr().out
    assert "prompt: 'The Eiffel Tower is in the city of'; logit of ' Paris'" in out
    rows = ATTR_ROW.findall(out)
    assert [int(r[0]) for r in rows] == list(range(30))
    for _, last, last_bar, subj, subj_bar in rows:
        # bars have the sign of their number
        assert set(last_bar) <= ({"#"} if float(last) >= 0 else {"-"})
        assert set(subj_bar) <= ({"#"} if float(subj) >= 0 else {"-"})
    # the final RMSNorm is scale-invariant: the last layer's own term is ~0
    assert abs(float(rows[-1][1])) < 0.05
    # some layer carries a real signal through " Eiffel"
    assert max(abs(float(r[3])) for r in rows) > 0.5


def test_attribution_matches_plain_autograd(lm):
    sample = load_sample("attribution")
    logit, last, subj = sample.attributions(lm)
    hf = lm._module
    tok = lm.tokenizer
    ids = tok(sample.PROMPT, return_tensors="pt")["input_ids"]
    (answer_id,) = tok(sample.ANSWER, add_special_tokens=False)["input_ids"]
    where = sample.token_positions(tok, sample.PROMPT, sample.SUBJECT)
    assert [tok.decode(ids[0, i]) for i in where] == [" E", "iffel"]
    seen = []
    hooks = {layer: lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
             for layer in hf.model.layers}
    with forward_hooks(hooks), torch.enable_grad():
        target = hf(ids).logits[0, -1, answer_id]
        grads = torch.autograd.grad(target, seen)
    assert logit == pytest.approx(float(target.detach()), abs=1e-4)
    for i, (g, h) in enumerate(zip(grads, seen)):
        a = (g * h).sum(-1)[0].detach()
        assert last[i] == pytest.approx(float(a[-1]), rel=1e-3, abs=1e-3), i
        assert subj[i] == pytest.approx(float(a[where].sum()), rel=1e-3, abs=1e-3), i


# --------------------------------------------------------------------------------------
# logit lens
# --------------------------------------------------------------------------------------

LENS_ROW = re.compile(r"^layer +(\d+)  ('.*?'|\".*?\") +(\d\.\d{3}) +(\d\.\d{3})", re.MULTILINE)


def test_logit_lens_main(capsys):
    load_sample("logit_lens").main()
    out = capsys.readouterr().out
    assert "the model's answer: ' Paris'" in out
    rows = LENS_ROW.findall(out)
    assert [int(r[0]) for r in rows] == list(range(30))
    assert rows[-1][1] == "' Paris'"
    # at the last layer the lens is the model itself: top token is the answer
    assert rows[-1][2] == rows[-1][3]
    assert float(rows[-1][3]) > 0.3
    # early layers do not know yet
    assert float(rows[0][3]) < 0.01


def test_logit_lens_last_layer_is_the_real_output(lm):
    sample = load_sample("logit_lens")
    with torch.no_grad():
        rows, real = sample.lens(lm)
        ids = lm.tokenizer(sample.PROMPT, return_tensors="pt")["input_ids"]
        probs = lm._module(ids).logits[0, -1].softmax(-1)
    (answer_id,) = lm.tokenizer(sample.ANSWER, add_special_tokens=False)["input_ids"]
    assert real == " Paris"
    assert len(rows) == 30
    token, p, p_answer = rows[-1]
    assert token == real
    assert p == pytest.approx(float(probs.max()), abs=1e-5)
    assert p_answer == pytest.approx(float(probs[answer_id]), abs=1e-5)
