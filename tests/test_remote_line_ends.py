"""A remote job's source must split into the same lines for Python, libcst and the
server, which cuts the block (or session) out of it with ``str.splitlines``: that also
splits at U+0085, U+2028 and U+2029, which Python's tokenizer does not.  One such
character before the block would shift the text the server compiles onto lines the
validator never checked (the line above the block; a session's own, unchecked call)."""

from __future__ import annotations

import pytest
import torch
from test_batching import lm, run  # noqa: F401 - lm is a fixture
from test_remote_app import job_message

from compiler.validate import ValidationError, validate_block, validate_session

SEPARATORS = ["\x85", "\u2028", "\u2029"]
TRACE = ('def job(model, x):\n'
         '    y = 1  # {sep}\n'
         '    z = print("unchecked", ().__class__.__base__)\n'
         '    with model.trace(x):\n'
         '        h = model.model.layers[0].output.save()\n'
         '        g = 1\n')
SESSION = ('def job(model, x):\n'
           '    y = 1  # {sep}\n'
           '    with model.session(remote=print("unchecked", ().__class__.__base__)):\n'
           '        a = 1\n'
           '        b = 2\n')


@pytest.mark.parametrize("sep", SEPARATORS, ids=ascii)
def test_a_line_separator_python_does_not_split_at_is_refused(sep):
    with pytest.raises(ValidationError, match="is not allowed in a remote job's source") as err:
        validate_block(TRACE.format(sep=sep), 0, free_names=("x",))
    assert err.value.line == 2
    with pytest.raises(ValidationError, match="is not allowed in a remote job's source"):
        validate_session(SESSION.format(sep=sep), 0, free_names=("x",))


@pytest.mark.parametrize("source", [TRACE, SESSION], ids=["trace", "session"])
def test_the_server_runs_no_line_the_validator_did_not_check(lm, source):  # noqa: F811
    data = job_message(source.format(sep="\u2028"), values={"x": torch.tensor([[1, 2]])},
                       **({"session": True} if "session" in source else {}))
    got, prints, _ = run(lm, [data], max_jobs=1)
    assert got[0][0] == b"E" and got[0][1]["type"] == "ValidationError", got[0]
    assert not prints
