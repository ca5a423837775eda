"""`n += 1` in a remote block or session on a variable bound before it reads that
variable: it must be sent (it was not: the server raised UnboundLocalError)."""

from __future__ import annotations

import torch
from serve_support import (
    http_fixture,  # noqa: F401 (a fixture)
    lm_fixture,  # noqa: F401 (a fixture)
    remote_fixture,  # noqa: F401 (a fixture)
)
from test_remote_session import IDS, engine  # noqa: F401 - engine: a fixture

from compiler import intervene


@intervene
def counted_trace(model, x, remote):
    n = 1
    with model.trace(x, remote=remote):
        n += 1
        h = (model.model.layers[0].output * n).save()
    return h


@intervene
def counted_session(model, x, remote):
    n = 1
    with model.session(remote=remote):
        n += 1
        with model.trace(x):
            h = model.model.layers[0].output.save()
    return n, h


def test_an_augmented_variable_is_sent_to_a_remote_trace(lm, remote):
    h = counted_trace(lm, IDS, True)
    h_local = counted_trace(lm, IDS, False)
    torch.testing.assert_close(h, h_local, atol=0, rtol=0)


def test_an_augmented_variable_is_sent_to_a_remote_session(lm, remote):
    n, h = counted_session(lm, IDS, True)
    n_local, h_local = counted_session(lm, IDS, False)
    assert n == n_local == 2
    torch.testing.assert_close(h, h_local, atol=0, rtol=0)
