"""When does the model produce a module value?  Order facts for checks.

Each module has two events: its input (``pre``, before it runs) and its
output (``out``, after).  ``precedes`` says whether one event surely comes
before another in a forward pass: exactly for a module and its descendants,
and for siblings in a ``ModuleList``/``Sequential`` (run in index order); for
other siblings from the order the model really called its modules, learned
on the first trace of each model (a module called more than once in a pass
gives no order facts).  ``None`` means "not known": callers then leave the
decision to the run itself.
"""

from __future__ import annotations

import torch

from .source import GENERIC, CallSite, site_order

PRE, OUT = "pre", "out"
_LISTS = (torch.nn.ModuleList, torch.nn.Sequential)


def ancestry(root, module) -> list:
    """[(module, index among its parent's children)] from the root down to ``module``."""
    parents = root._parents()
    chain = []
    node = module
    while True:
        chain.append(node)
        entry = parents.get(id(node))
        if entry is None:
            break
        node = entry
    chain.reverse()
    return chain


def _compute(root, ma, pa: str, mb, pb: str):
    if ma.__class__ is CallSite or mb.__class__ is CallSite:  # `.source`: runtime/source.py
        verdict = site_order(root, ma, pa, mb, pb)
        if verdict is not GENERIC:
            return verdict
    repeated = root._repeated
    if ma is mb:
        # One call: its input comes before its output.  Called again: no fact.
        return None if id(ma) in repeated else (pa == PRE and pb == OUT)
    ca, cb = ancestry(root, ma), ancestry(root, mb)
    i = 0
    while i < len(ca) and i < len(cb) and ca[i] is cb[i]:
        i += 1
    if i == 0:
        return None  # not in the same model
    if i == len(ca):  # ma is an ancestor of mb
        return None if id(ma) in repeated else pa == PRE
    if i == len(cb):  # mb is an ancestor of ma
        return None if id(mb) in repeated else pb == OUT
    parent, a, b = ca[i - 1], ca[i], cb[i]
    if id(a) in repeated or id(b) in repeated:
        return None
    if isinstance(parent, _LISTS):
        children = list(parent._modules.values())
        return children.index(a) < children.index(b)
    seen = root._order
    ia, ib = seen.get(id(a)), seen.get(id(b))
    if ia is not None and ib is not None:
        return ia < ib
    if ib is not None and ia is None and not root._order_complete:
        # b has started (it is running now or ran), a has not: a comes later.
        return False
    return None


def precedes(root, ma, pa: str, mb, pb: str):
    """True if event (ma, pa) surely comes before (mb, pb); False if surely not;
    None if unknown."""
    key = (id(ma), pa, id(mb), pb)
    cache = root._precedes_cache
    result = cache.get(key, cache)
    if result is cache:
        result = _compute(root, ma, pa, mb, pb)
        if result is not None and root._order_complete:
            cache[key] = result
    return result
