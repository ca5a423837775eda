"""The six cases, their targets, and the rows they contribute to the results.

Every timed row is measured by ``timing.interleaved`` over the three sides
(intervene, plain hooks, nnsight).  Before timing, each side runs once and its
result is compared with the plain-hooks result; a side that raises, or returns
something else, is reported as "not supported yet" (or "wrong result") and not
timed, so an unfinished feature never stops the suite.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import gc
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import memory, ours, plain, timing
from .models import NNSIGHT_MISSING, Trio, inputs, language_trio, mlp_trio, residue, theirs

SAMPLE_S = 50e-6  # shortest sample; shorter calls are repeated back to back
PROMPT = "The quick brown fox jumps over the lazy dog because"


@dataclass
class Config:
    quick: bool = False

    @property
    def budget_s(self) -> float:
        """Seconds of timing per row of the small-model cases."""
        return 0.6 if self.quick else 3.0

    @property
    def max_rounds(self) -> int:
        return 200 if self.quick else 1500


@dataclass
class Row:
    case: str
    name: str
    ours: float | None = None
    plain: float | None = None
    nnsight: float | None = None
    unit: str = "µs"
    target: str = ""
    status: str = "info"  # PASS, MISS, n/a, info
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)  # paired, when timed
    headline: str = ""  # what the summary says of this row, when not the ratio

    def ratio(self, side: str) -> float | None:
        """``side`` / plain: the median of per-round ratios when timed, else of the values."""
        if side in self.ratios:
            return self.ratios[side]
        value = getattr(self, side)
        if value is None or not self.plain:
            return None
        return value / self.plain


@dataclass
class Outcome:
    """What one case found: table rows, and data for the plot."""

    rows: list[Row] = field(default_factory=list)
    plot: dict[str, Any] = field(default_factory=dict)


# -- measuring -----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 140:
        first = first[:137] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def agree(a, b) -> bool:
    """Same tensors (nested in lists, tuples, dicts), up to float rounding."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(agree(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[k], b[k]) for k in a)
    return a is None and b is None


@dataclass
class Timed:
    medians: dict[str, float | None]
    spreads: dict[str, float]
    problems: dict[str, str]
    samples: dict[str, list[float]] = field(default_factory=dict)

    def paired(self, side: str, reference: str = "plain") -> float | None:
        """Median over rounds of side / reference within the same round."""
        a, b = self.samples.get(side), self.samples.get(reference)
        if not a or not b:
            return None
        return timing.median([x / y for x, y in zip(a, b)])

    def paired_difference(self, side: str, reference: str = "plain") -> float | None:
        """Median over rounds of side - reference within the same round."""
        a, b = self.samples.get(side), self.samples.get(reference)
        if not a or not b:
            return None
        return timing.median([x - y for x, y in zip(a, b)])

    def select(self, names: dict[str, str]) -> Timed:
        """A view with sides renamed (``{"ours@4": "ours", ...}``), others left out."""
        return Timed(
            {new: self.medians.get(old) for old, new in names.items()},
            {new: self.spreads[old] for old, new in names.items() if old in self.spreads},
            {new: self.problems[old] for old, new in names.items() if old in self.problems},
            {new: self.samples[old] for old, new in names.items() if old in self.samples},
        )

    def ratio_quartiles(self, side: str) -> tuple[float, float] | None:
        a, b = self.samples.get(side), self.samples.get("plain")
        if not a or not b or len(a) < 4:
            return None
        q = statistics.quantiles([x / y for x, y in zip(a, b)], n=4)
        return q[0], q[2]

    def row(self, case: str, name: str, target: float | None = None, **kw) -> Row:
        row = Row(case, name, self.medians.get("ours"), self.medians.get("plain"),
                  self.medians.get("nnsight"), **kw)
        for side in ("ours", "nnsight"):
            r = self.paired(side)
            if r is not None:
                row.ratios[side] = r
        notes = [f"{side}: {msg}" for side, msg in self.problems.items()]
        if self.medians.get("ours") is not None and self.medians.get("plain") is not None:
            notes.append("noise ±{:.1f}% / ±{:.1f}%".format(
                100 * self.spreads.get("ours", 0.0), 100 * self.spreads.get("plain", 0.0)))
            quartiles = self.ratio_quartiles("ours")
            if quartiles is not None:
                notes.append("intervene/plain per round: quartiles {:.3f}–{:.3f}, {} rounds"
                             .format(*quartiles, len(self.samples["ours"])))
        if row.note:
            notes.insert(0, row.note)
        row.note = "; ".join(notes)
        if target is not None:
            row.target = f"≤ {target:.2f}x plain"
            r = row.ratio("ours")
            row.status = "n/a" if r is None else ("PASS" if r <= target else "MISS")
            quartiles = self.ratio_quartiles("ours")
            if quartiles is not None and quartiles[0] <= target <= quartiles[1]:
                row.note += ("; inconclusive: the target lies between the quartiles of the "
                             "per-round ratios (noise)")
        return row


def measure(
    sides: dict[str, Callable[[], Any] | None],
    cfg: Config,
    *,
    reference: str | Callable[[str], str | None] = "plain",
    budget_s: float | None = None,
    max_rounds: int | None = None,
    min_rounds: int = 5,
    warmup: int = 3,
    check: Callable[[Any, Any], bool] = agree,
    errors: dict[str, str] | None = None,
    unchecked: tuple[str, ...] = ("forward",),
    shared: torch.nn.Module | None = None,
) -> Timed:
    """Check every side against its reference once, then time the working ones.

    ``reference`` names the side every other is checked against, or maps a side's
    name to its reference (``"ours@4"`` -> ``"plain@4"``; None: not checked).

    Sides in ``unchecked`` (references such as the bare forward) are timed only.
    ``shared`` is the module intervene shares with plain hooks: it must be left
    without hooks or patches, which is checked at the end."""
    problems: dict[str, str] = dict(errors or {})
    results: dict[str, Any] = {}
    working: dict[str, Callable[[], Any]] = {}
    once: dict[str, float] = {}
    for side, fn in sides.items():
        if fn is None:
            problems.setdefault(side, NNSIGHT_MISSING if side.startswith("nnsight") and
                                theirs is None else "not available")
            continue
        try:
            t0 = time.perf_counter()
            results[side] = fn()
            once[side] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - an unfinished feature is a result
            problems[side] = "not supported yet (" + _describe(exc) + ")"
            continue
        working[side] = fn
    reference_of = reference if callable(reference) else (lambda _side: reference)
    for side in list(working):
        ref = reference_of(side)
        if side in unchecked or ref is None or side == ref or ref not in results:
            continue
        if not check(results[side], results[ref]):
            problems[side] = "wrong result (differs from plain hooks)"
            del working[side]
    results.clear()
    medians: dict[str, float | None] = {side: None for side in sides}
    spreads: dict[str, float] = {}
    if working:
        budget = cfg.budget_s if budget_s is None else budget_s
        cap = cfg.max_rounds if max_rounds is None else max_rounds
        # One call of each side, timed again unless the first was already long
        # (its first call may include compiling and caches).
        for side, fn in working.items():
            if once[side] < 0.5:
                once[side] = _once(fn)
        # Short samples: on a shared machine a sample is spoiled when another process
        # takes the core during it, so the shorter the sample, the fewer are spoiled and
        # the cleaner the median.  One call per sample unless a call is under 50 µs.
        inner = max(1, min(50, int(SAMPLE_S / max(min(once[s] for s in working), 1e-6))))
        per_round = sum(once[s] for s in working) * inner
        rounds = int(max(min_rounds, min(cap, budget / max(per_round, 1e-9))))
        samples = timing.interleaved(working, rounds=rounds, inner=inner, warmup=warmup)
        for side, xs in samples.items():
            medians[side] = timing.median(xs)
            spreads[side] = timing.spread(xs)
        timed = Timed(medians, spreads, problems, samples)
    else:
        timed = Timed(medians, spreads, problems)
    left = residue(shared) if shared is not None else []
    if left:
        timed.problems["ours"] = "left hooks or patches on " + ", ".join(left[:3])
    return timed


def _once(fn: Callable[[], Any]) -> float:
    """Seconds for one call (the lower of two)."""
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ours(fn: Callable, *args) -> Callable[[], Any] | None:
    """intervene's side: compiled now; a compile error becomes "not supported yet"."""
    try:
        compiled = ours.compiled(fn)
    except Exception as exc:  # noqa: BLE001
        return _raiser(exc)
    return functools.partial(compiled, *args)


def _raiser(exc: BaseException) -> Callable[[], Any]:
    def fail():
        raise exc

    return fail


# -- 1. fixed cost -----------------------------------------------------------------------------


def fixed_cost(cfg: Config) -> Outcome:
    trio = mlp_trio(12, 32)
    x = inputs(2, 32)
    out = Outcome()
    case = "1. fixed cost (12-layer MLP, hidden 32, batch 2)"
    every = list(range(12))
    experiments = [
        ("one saved output", "save_one", ()),
        ("one in-place write + one save", "write_save", ()),
        ("all 12 outputs saved", "save_loop", (every,)),
    ]
    for name, fn, extra in experiments:
        timed = measure(
            {
                "ours": _ours(getattr(ours, fn), trio.ours, x, *extra),
                "plain": functools.partial(getattr(plain, fn), trio.plain, x, *extra),
                "nnsight": _theirs(getattr, fn, trio.nnsight, x, *extra),
            },
            cfg,
            shared=trio.plain,
        )
        out.rows.append(timed.row(case, name, target=1.05))
    return out


# -- 2. scaling --------------------------------------------------------------------------------

CHECKPOINTS = (1, 4, 16, 64)
INVOKES = (1, 4, 16)
SIDES = ("ours", "plain", "nnsight")


def _same_count(side: str) -> str | None:
    """``ours@4`` is checked against ``plain@4``; the bare forward against nothing."""
    return "plain@" + side.split("@", 1)[1] if "@" in side else None


def scaling(cfg: Config) -> Outcome:
    from . import generated

    out = Outcome()
    case = "2a. checkpoints (64-layer MLP, hidden 32, batch 2)"
    trio = mlp_trio(64, 32)
    x = inputs(2, 32)
    series: dict[str, list[float | None]] = {"ours": [], "plain": [], "nnsight": [], "forward": []}
    above: dict[str, list[float | None]] = {"ours": [], "nnsight": []}  # paired, vs plain
    # All counts in the same rounds, so every count sees the same machine.
    sides: dict[str, Callable[[], Any] | None] = {}
    for k in CHECKPOINTS:
        idx = [i * 64 // k for i in range(k)]
        sides[f"ours@{k}"] = _ours(ours.save_loop, trio.ours, x, idx)
        sides[f"plain@{k}"] = functools.partial(plain.save_loop, trio.plain, x, idx)
        sides[f"nnsight@{k}"] = _theirs(getattr, "save_loop", trio.nnsight, x, idx)
    sides["forward"] = functools.partial(plain.forward, trio.plain, x)
    everything = measure(sides, cfg, reference=_same_count, shared=trio.plain,
                         budget_s=4 * cfg.budget_s)
    fwd = everything.medians.get("forward")
    for k in CHECKPOINTS:
        timed = everything.select({f"{side}@{k}": side for side in SIDES})
        for side, ys in series.items():
            ys.append(fwd if side == "forward" else timed.medians.get(side))
        for side, ys in above.items():
            ys.append(timed.paired_difference(side))
        row = timed.row(case, f"{k} checkpoint{'s' if k > 1 else ''}")
        if fwd is not None:
            row.note = f"forward without hooks {fwd:.1f} µs; " + row.note
        out.rows.append(row)
    slopes = {
        side: (timing.slope(list(CHECKPOINTS), ys) if all(y is not None for y in ys) else None)
        for side, ys in series.items()
    }
    extra = {
        side: (timing.slope(list(CHECKPOINTS), ys) if all(y is not None for y in ys) else None)
        for side, ys in above.items()
    }
    row = Row(case, "slope: cost per extra checkpoint", slopes["ours"], slopes["plain"],
              slopes["nnsight"], unit="µs/checkpoint", target="≤ plain + 2 µs")
    if extra["ours"] is not None:
        row.status = "PASS" if extra["ours"] <= 2.0 else "MISS"
        row.headline = f"intervene {extra['ours']:+.2f} µs per checkpoint above plain hooks"
        row.note = (f"intervene {extra['ours']:+.2f} µs per checkpoint above plain hooks "
                    "(slope of the per-round paired differences; the columns are slopes of "
                    "the medians)")
        if extra["nnsight"] is not None:
            row.note += f"; nnsight {extra['nnsight']:+.2f} µs"
    else:
        row.status = "n/a"
    out.rows.append(row)
    out.plot = {"checkpoints": list(CHECKPOINTS), "series": series, "slopes": slopes}

    # Invokes: N inputs of 2 rows each, batched into one forward; each invoke saves
    # its own rows of one layer's output.
    case = "2b. invokes (12-layer MLP, hidden 32, 2 rows per invoke)"
    gen = generated.module()
    trio = mlp_trio(12, 32)
    inv_series: dict[str, list[float | None]] = {"ours": [], "plain": [], "nnsight": []}
    sides = {}
    for n in INVOKES:
        xs = [inputs(2, 32, seed=100 + i) for i in range(n)]
        sides[f"ours@{n}"] = _ours(getattr(gen, f"ours_invokes_{n}"), trio.ours, xs)
        sides[f"plain@{n}"] = functools.partial(plain.invokes, trio.plain, xs, 5)
        sides[f"nnsight@{n}"] = (functools.partial(getattr(gen, f"theirs_invokes_{n}"),
                                                   trio.nnsight, xs)
                                 if trio.nnsight is not None else None)
    everything = measure(sides, cfg, reference=_same_count, shared=trio.plain,
                         budget_s=3 * cfg.budget_s)
    for n in INVOKES:
        timed = everything.select({f"{side}@{n}": side for side in SIDES})
        for side, ys in inv_series.items():
            ys.append(timed.medians.get(side))
        out.rows.append(timed.row(case, f"{n} invoke{'s' if n > 1 else ''}"))
    inv_slopes = {
        side: (timing.slope(list(INVOKES), ys) if all(y is not None for y in ys) else None)
        for side, ys in inv_series.items()
    }
    row = Row(case, "slope: cost per extra invoke", inv_slopes["ours"], inv_slopes["plain"],
              inv_slopes["nnsight"], unit="µs/invoke", target="≤ plain + 1 µs")
    if inv_slopes["ours"] is not None and inv_slopes["plain"] is not None:
        extra = inv_slopes["ours"] - inv_slopes["plain"]  # issue 12: within 1 µs of slicing
        row.status = "PASS" if extra <= 1.0 else "MISS"
        row.headline = f"intervene {extra:+.2f} µs per invoke above plain slicing"
        row.note = row.headline + " (slopes of the medians)"
    else:
        row.status = "n/a"
    out.rows.append(row)
    out.plot["invokes"] = {"counts": list(INVOKES), "series": inv_series}
    return out


# -- 3 and 4. the default model ---------------------------------------------------------------

_LM: tuple[Trio, Any] | None = None


def _language() -> tuple[Trio, Any]:
    global _LM
    if _LM is None:
        _LM = language_trio()
    return _LM


def real_model(cfg: Config) -> Outcome:
    trio, tok = _language()
    n = len(trio.plain.model.layers)
    case = f"3. default model (smollm2-135m), one prompt, {n} layer outputs saved"
    errors = {k: v for k, v in (("ours", trio.ours_error), ("nnsight", trio.nnsight_error)) if v}
    timed = measure(
        {
            "ours": _ours(ours.lm_layers, trio.ours, PROMPT, n) if trio.ours is not None else None,
            "plain": functools.partial(plain.lm_layers, trio.plain, tok, PROMPT, n),
            "nnsight": (functools.partial(theirs.lm_layers, trio.nnsight, PROMPT, n)
                        if trio.nnsight is not None else None),
        },
        cfg,
        # 115 ms calls on a shared machine vary by ±4-8% from round to round: enough
        # rounds that the median ratio is good to about ±1%.
        budget_s=4.0 if cfg.quick else 50.0,
        min_rounds=3 if cfg.quick else 30,
        warmup=1,
        errors=errors,
        shared=trio.plain,
    )
    tokens = len(tok(PROMPT)["input_ids"])
    return Outcome([timed.row(case, f"trace, {tokens} tokens", target=1.02, unit="µs")])


def _first_working(candidates, *args) -> tuple[Callable[[], Any], str]:
    """The first candidate experiment that compiles and runs (for intervene's side),
    and its name."""
    failures = []
    for fn in candidates:
        call = _ours(fn, *args)
        assert call is not None
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)
            continue
        return call, fn.__name__
    return _raiser(failures[0]), ""


def generation(cfg: Config) -> Outcome:
    trio, tok = _language()
    steps = 8 if cfg.quick else 32
    layer = 10
    case = f"4. generation (smollm2-135m), {steps} new tokens, a write at every step"
    errors = {k: v for k, v in (("ours", trio.ours_error), ("nnsight", trio.nnsight_error)) if v}
    # The form intervene supports is chosen on a 2-token run (cheap), then timed.
    ours_fn, form = None, ""
    if trio.ours is not None:
        probe, form = _first_working(ours.GENERATE, trio.ours, PROMPT, 2, layer)
        chosen = {fn.__name__: fn for fn in ours.GENERATE}.get(form)
        ours_fn = _ours(chosen, trio.ours, PROMPT, steps, layer) if chosen else probe

    def same_tokens(a, b) -> bool:
        # intervene's last candidate returns nothing: it is checked by running only.
        return a is None or agree(a, b)

    timed = measure(
        {
            "ours": ours_fn,
            "plain": functools.partial(plain.generate_with, trio.plain, tok, PROMPT, steps, layer),
            "nnsight": (functools.partial(theirs.generate_with, trio.nnsight, PROMPT, steps, layer)
                        if trio.nnsight is not None else None),
        },
        cfg,
        budget_s=1.0 if cfg.quick else 30.0,
        min_rounds=2 if cfg.quick else 6,  # 6: each order of the three sides once
        max_rounds=3 if cfg.quick else 9,
        warmup=0,  # the checking call warmed every side up
        check=same_tokens,
        errors=errors,
        shared=trio.plain,
    )
    forms = {
        "generate_with": "`with tracer.all():` then `model.generator.output.save()`",
        "generate_for": "`for step in tracer.all():` then `model.generator.output.save()`",
        "generate_only": "`with tracer.all():`, tokens not returned (not compared)",
    }
    row = timed.row(case, "generate", target=1.02, unit="µs",
                    note=f"intervene form: {forms[form]}" if form else "")
    if row.ours is None:
        row.status = "n/a"
    return Outcome([row])


# -- 5. compile --------------------------------------------------------------------------------


@contextlib.contextmanager
def _counting(counts: dict[str, int]):
    """Count calls of every entry point that parses or compiles source."""
    import ast
    import inspect

    import libcst

    patched = [
        (libcst, "parse_module"), (libcst, "parse_expression"), (libcst, "parse_statement"),
        (ast, "parse"), (inspect, "getsource"), (inspect, "getsourcelines"),
        (builtins, "compile"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patched]

    def counter(label, real):
        def wrapped(*args, **kwargs):
            counts[label] = counts.get(label, 0) + 1
            return real(*args, **kwargs)

        return wrapped

    try:
        for obj, name, real in saved:
            setattr(obj, name, counter(f"{obj.__name__}.{name}", real))
        yield counts
    finally:
        for obj, name, real in saved:
            setattr(obj, name, real)


def _fresh(fn: types.FunctionType) -> types.FunctionType:
    """A new function object with ``fn``'s code (as a fresh ``def`` would make)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    return new


def compile_cost(cfg: Config) -> Outcome:
    from compiler import intervene

    from .compile_case import experiment

    case = "5. compile (a 40-line experiment: 5 traces, 2 invokes, loops)"
    out = Outcome()
    reps = 8 if cfg.quick else 40
    times: list[float] = []
    error = None
    try:
        intervene(_fresh(experiment))  # imports and first-use caches
        for _ in range(reps):
            fn = _fresh(experiment)
            gc.collect()
            t0 = time.perf_counter_ns()
            intervene(fn)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    except Exception as exc:  # noqa: BLE001
        error = _describe(exc)
    row = Row(case, f"decoration: intervene(fn), median of {reps}", unit="ms",
              target="< 60 ms")
    if times:
        row.ours = timing.median(times)
        row.status = "PASS" if row.ours < 60 else "MISS"
        row.note = f"min {min(times):.1f} ms, max {max(times):.1f} ms; plain hooks compile nothing"
    else:
        row.status, row.note = "n/a", f"ours: {error}"
    out.rows.append(row)

    # Later calls: nothing parsed or compiled on the call path.
    trio = mlp_trio(12, 32)
    x, y = inputs(2, 32), inputs(2, 32, seed=7)
    calls = 100
    what = "the 40-line experiment"
    try:
        run = intervene(_fresh(experiment))
        run(trio.ours, x, y, 2.0)
        call = functools.partial(run, trio.ours, x, y, 2.0)
    except Exception as exc:  # noqa: BLE001 - fall back to a one-checkpoint experiment
        what = f"save_one (the 40-line experiment fails: {_describe(exc)})"
        run = intervene(_fresh(ours.save_one))
        xx = inputs(2, 32)
        run(trio.ours, xx)
        call = functools.partial(run, trio.ours, xx)
    counts: dict[str, int] = {}
    t0 = time.perf_counter_ns()
    with _counting(counts):
        for _ in range(calls):
            call()
    per_call = (time.perf_counter_ns() - t0) / calls / 1e3
    parses = sum(counts.values())

    nn_counts: dict[str, int] = {}
    if trio.nnsight is not None:
        xx = inputs(2, 32)
        theirs.save_one(trio.nnsight, xx)
        with _counting(nn_counts):
            for _ in range(calls):
                theirs.save_one(trio.nnsight, xx)
    row = Row(case, f"parses/compiles during {calls} later calls", float(parses), 0.0,
              float(sum(nn_counts.values())) if trio.nnsight is not None else None,
              unit="count", target="0")
    row.status = "PASS" if parses == 0 else "MISS"
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    nn_detail = (", ".join(f"{k} {v}" for k, v in sorted(nn_counts.items())) or "none"
                 if trio.nnsight is not None else "not installed")
    row.note = (f"ours calls {what}: {detail} ({per_call:.0f} µs per call, 5 traces); "
                f"nnsight, {calls} traces of one saved output: {nn_detail}")
    out.rows.append(row)
    return out


# -- 6. memory ---------------------------------------------------------------------------------


def memory_case(cfg: Config) -> Outcome:
    from . import generated

    n, rows_each, hidden = 64, 2, 256
    case = (f"6. memory: {n} invokes ({rows_each} rows each) vs one batched forward "
            f"(12-layer MLP, hidden {hidden})")
    gen = generated.module()
    trio = mlp_trio(12, hidden)
    xs = [inputs(rows_each, hidden, seed=200 + i) for i in range(n)]
    sides: dict[str, Callable[[], Any]] = {
        "ours": _ours(getattr(gen, f"ours_invokes_{n}"), trio.ours, xs),
        "plain": functools.partial(plain.invokes, trio.plain, xs, 5),
        "nnsight": (functools.partial(getattr(gen, f"theirs_invokes_{n}"), trio.nnsight, xs)
                    if trio.nnsight is not None else None),
    }
    reps = 1 if cfg.quick else 3
    peak: dict[str, float | None] = {}
    kept: dict[str, float | None] = {}
    heap: dict[str, float | None] = {}
    problems: dict[str, str] = {}
    reference = sides["plain"]()
    for side, fn in sides.items():
        if fn is None:
            peak[side] = kept[side] = heap[side] = None
            problems[side] = NNSIGHT_MISSING
            continue
        try:
            if not agree(fn(), reference):
                raise RuntimeError("wrong result (differs from plain hooks)")
            fn()  # warm
            measured = [memory.tensor_bytes(fn) for _ in range(reps)]
            peak[side] = timing.median([p for p, _ in measured]) / 1024
            kept[side] = timing.median([k for _, k in measured]) / 1024
            heap[side] = timing.median([memory.python_bytes(fn) for _ in range(reps)]) / 1024
        except Exception as exc:  # noqa: BLE001
            peak[side] = kept[side] = heap[side] = None
            problems[side] = "not supported yet (" + _describe(exc) + ")"
    note = "; ".join(f"{k}: {v}" for k, v in problems.items())
    out = Outcome()
    row = Row(case, "peak tensor memory of the call", peak["ours"], peak["plain"],
              peak["nnsight"], unit="KiB", target="≤ 1.10x plain", note=note)
    r = row.ratio("ours")
    row.status = "n/a" if r is None else ("PASS" if r <= 1.10 else "MISS")
    out.rows.append(row)
    out.rows.append(Row(case, "tensor memory still held by the results", kept["ours"],
                        kept["plain"], kept["nnsight"], unit="KiB"))
    out.rows.append(Row(case, "peak Python heap of the call (tracemalloc)", heap["ours"],
                        heap["plain"], heap["nnsight"], unit="KiB"))
    return out


def _theirs(get, name: str, net, *args):
    """nnsight's side of an experiment, or None (not timed) when nnsight is missing."""
    if net is None or theirs is None:
        return None
    return functools.partial(get(theirs, name), net, *args)


def source_case(cfg: Config) -> Outcome:
    """7. ``.source`` costs nothing where it is not used: bench/source_case.py."""
    from .source_case import source_cost

    return source_cost(cfg)


CASES: dict[str, Callable[[Config], Outcome]] = {
    "fixed": fixed_cost,
    "scaling": scaling,
    "model": real_model,
    "generate": generation,
    "compile": compile_cost,
    "memory": memory_case,
    "source": source_case,
}
