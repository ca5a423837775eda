"""A server trace with a cache runs its whole forward (Tracer.cache turns off the early
end as a lane opens one), alone and in a pass shared with a job that would end early."""

from __future__ import annotations

import torch
from test_batching import A, B, lm, message, run, saved  # noqa: F401 - lm is a fixture
from test_serve_early_end import CACHED, EARLY, calls, hidden  # noqa: F401 - calls is a fixture

LATE_CACHE = '''def job(model, x):
    with model.trace(x) as tracer:
        h = model.model.layers[0].output.save()
        cache = tracer.cache()
'''


def test_a_cache_in_a_shared_pass_keeps_the_whole_forward(lm, calls):  # noqa: F811
    got, _, _ = run(lm, [message(EARLY, x=A), message(CACHED, x=B)])
    assert [r[0] for r in got] == [b"R", b"R"], got
    assert calls == {"layer1": 1, "lm_head": 1}  # one shared pass, run to the LM head
    torch.testing.assert_close(saved(got[0], "h"), hidden(lm, A, 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(saved(got[1], "h"), hidden(lm, B, 0), atol=1e-5, rtol=0)


def test_a_cache_opened_after_a_read_keeps_the_whole_forward(lm, calls):  # noqa: F811
    got, _, _ = run(lm, [message(LATE_CACHE, x=A)], max_jobs=1)
    assert got[0][0] == b"R", got[0]
    assert calls == {"layer1": 1, "lm_head": 1}
    torch.testing.assert_close(saved(got[0], "h"), hidden(lm, A, 0), atol=1e-5, rtol=0)
