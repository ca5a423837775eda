"""Gradient checkpoints: ``with loss.backward():`` blocks.

A lane opens a backward session when it reaches ``with loss.backward(**kw):``;
the backward pass starts at the block's first ``x.grad`` (or at its end).
While it runs, tensor hooks hand each requested gradient to the waiting lane,
in the order autograd computes them (the reverse of the forward), and what the
lane writes (``x.grad = v``, in-place edits) is the gradient that flows on.
For an invoke, ``x`` is a view of its rows: the hook sits on the batch tensor
and the lane sees (and writes) its rows of the gradient.
"""

from __future__ import annotations

import torch


class BackwardSession:
    __slots__ = ("end_waiting", "fired", "hooks", "kwargs", "loss", "site", "state", "waiting")

    def __init__(self, loss, kwargs: dict, site: int) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"`with x.backward():` needs a tensor, got {type(loss).__name__}")
        self.loss = loss
        self.kwargs = kwargs
        self.site = site
        self.state = "new"  # -> "running" -> "done"
        self.waiting: dict[int, list] = {}  # id(tensor) -> [(lane, request, rows)]
        self.fired: set[int] = set()
        self.hooks: list = []
        self.end_waiting: list = []

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
