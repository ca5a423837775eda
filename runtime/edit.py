"""``with model.edit() as edited:``: a persistent edited model, as nnsight's.

The block's interventions are compiled like a trace block's (kind ``"edit"``) but
run nothing when the block ends: its lanes are kept by ``edited``, a new wrapper
of the same torch module, and every later trace of ``edited`` runs them first, in
its first forward pass, each edit in an interleaver of its own (so its errors name
the edit block's lines) attached before the trace's own (so the trace's code sees
the edited values).  ``model`` itself, and any other wrapper of the module, stays
untouched.  ``model.edit(inplace=True)`` edits ``model`` itself;
``model.clear_edits()`` drops its edits.

The compiled code for an edit block is the trace block's, with ``'edit'``:
``with __iv.block(model, 'edit', i) as edited:`` ... ``__iv.lane(edited, fn, None, 0)``:
``__iv.block`` returns an ``EditBlock`` whose ``__enter__`` gives the edited wrapper.
"""

from __future__ import annotations

from typing import Any

from .interleave import Interleaver


class Edit:
    """One edit block: its plan and lanes (functions that make a fresh lane)."""

    __slots__ = ("block", "filename", "lanes", "sites")

    def __init__(self, block, sites: dict, filename: str) -> None:
        self.block = block
        self.sites = sites
        self.filename = filename
        self.lanes: list[tuple[Any, None, int]] = []  # (fn, spec, index), as a Tracer's


class EditBlock:
    """What ``__iv.block(model, 'edit', i)`` returns."""

    __slots__ = ("edit", "target")

    def __init__(self, model, block, sites: dict, filename: str, args: tuple,
                 kwargs: dict) -> None:
        inplace = kwargs.pop("inplace", False)
        if args or kwargs:
            raise TypeError(
                "`model.edit()` takes only inplace=True/False; the edit's interventions go "
                "in its block and apply to every later trace of the edited model"
            )
        self.target = model if inplace else _copy(model)
        self.edit = Edit(block, sites, filename)

    def __enter__(self):
        self.target._recording = self.edit
        return self.target

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.target._recording = None
        if exc_type is None:
            self.target._edits = (*(self.target._edits or ()), self.edit)
        return False

    def __repr__(self) -> str:
        return f"<edit block of {self.target._path}>"


def add_lane(model, fn, spec, index: int) -> None:
    """``__iv.lane(edited, fn, spec, index)`` inside an edit block."""
    edit = model._recording
    if edit is None:
        raise RuntimeError("a lane is registered with a model outside its edit block")
    if spec is not None:
        raise TypeError(
            f"invokes in an edit block (line {edit.block.line}) are not supported: an edit "
            "applies to the whole batch of every later trace"
        )
    edit.lanes.append((fn, None, index))


def _copy(model):
    """A new wrapper of ``model``'s module (same class, tokenizer, lazy load, renames)."""
    from .language import LanguageModel
    from .nnsight import NNsight

    edited = LanguageModel(model) if isinstance(model, LanguageModel) else NNsight(model)
    edited._renames = model._renames
    edited._edits = model._edits  # the edits of `model` stay in `edited` too
    return edited


def start_edits(root, grad: bool, inters: list) -> None:
    """Before a trace of ``root`` runs: one interleaver per edit, attached and started
    (before the trace's own, whose wrappers then go on top: its code sees edited values);
    each goes into ``inters`` as soon as it exists, for cleanup."""
    from .tracer import block_facts

    for edit in root._edits:
        inter = Interleaver(root, edit.block, edit.sites, edit.filename)
        inter.activate()
        inters.append(inter)
        inter.attach_static(block_facts(root, edit.block), edit.lanes, None, grad)


def finish_edits(inters: list) -> None:
    for inter in inters:
        inter.finish()


def cleanup_steps(inters: list) -> list:
    """Undo the edits' interleavers after the trace's own, the last one first (each
    wrapped ``forward`` is put back to what it wrapped)."""
    return [inter.cleanup for inter in reversed(inters)]
