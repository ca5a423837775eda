"""A remote session's body with blank lines keeps its line numbers on the server (the
body is cut out as a block's is: runtime/serve/execute._block_function)."""

from __future__ import annotations

import traceback

import pytest
from serve_support import (
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
)
from test_remote_session import IDS, engine  # noqa: F401 - engine: the server's, a fixture
from test_remote_session_whole import requests  # noqa: F401 - a fixture

from compiler import intervene


@intervene
def failing_after_blank_lines(model, x):
    with model.session(remote=True):
        with model.trace(x):
            h = model.model.layers[0].output.save()

        n = 1

        bad = h[0, 99]  # raises on the server
        with model.trace(x):
            model.model.layers[0].output[:] = bad
    return h, n


def test_an_error_after_blank_lines_is_raised_at_the_users_line(lm, requests):  # noqa: F811
    with pytest.raises(IndexError) as info:
        failing_after_blank_lines(lm, IDS)
    line = failing_after_blank_lines.__wrapped__.__code__.co_firstlineno + 8  # `bad = h[0, 99]`
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == __file__ and frames[-1].lineno == line
    assert "index 99 is out of bounds" in str(info.value)
    assert len(requests) == 1
