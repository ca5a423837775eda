"""A value sent under the served model's name is refused with its message
(runtime/serve/execute._check_values, shared by blocks and sessions)."""

from __future__ import annotations

from test_batching import A, lm, message, run  # noqa: F401 - lm is a fixture

EARLY = '''def job(model, x):
    with model.trace(x):
        h = model.model.layers[0].output.save()
'''


def test_a_value_named_as_the_served_model_is_refused(lm):  # noqa: F811
    got, _, _ = run(lm, [message(EARLY, model=A, x=A)], max_jobs=1)
    assert got[0][0] == b"E"
    assert got[0][1]["type"] == "ValueError"
    assert got[0][1]["message"] == "`model` is the served model; it cannot be sent"
