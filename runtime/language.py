"""``LanguageModel``: a transformers causal LM, ready for traces and generation.

Inputs (text, lists of prompts, token ids, dicts) are encoded by
``runtime.models.encode``: left-padded, masked and with matching position
ids, so every row gives what its prompt gives alone.  Several invokes are
merged into one left-padded batch; each invoke sees its own rows.
``generate`` blocks run the model's own ``generate``: step k is its k-th
forward call.
"""

from __future__ import annotations

from typing import Any

import torch

from .envoy import Envoy
from .models import encode, load_causal_lm
from .nnsight import NNsight


class _Generator(torch.nn.Module):
    """Stands for the generation loop: ``model.generator.output`` is the full
    sequence of token ids, available once generation has ended."""

    def forward(self, ids):  # pragma: no cover - never called
        return ids


class LanguageModel(NNsight):
    """``LanguageModel(source, *, tokenizer=None, device_map=None, dispatch=False,
    dtype=None, **from_pretrained_kwargs)``.

    ``source``: a local checkpoint folder, a hub id already in the local cache,
    a built ``PreTrainedModel`` (pass ``tokenizer=``), or ``"smollm2-135m"``.
    """

    __slots__ = ("_generator", "tokenizer")

    def __init__(
        self,
        source: Any,
        *,
        tokenizer: Any = None,
        device_map: Any = None,
        dispatch: bool = False,
        dtype: Any = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        model, tok = load_causal_lm(
            source, tokenizer=tokenizer, device_map=device_map, dtype=dtype,
            **from_pretrained_kwargs,
        )
        super().__init__(model)
        object.__setattr__(self, "tokenizer", tok)
        gen = _Generator()
        object.__setattr__(self, "_generator", Envoy(gen, "model.generator", self))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LanguageModel.__slots__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def generator(self) -> Envoy:
        return self._generator

    @property
    def config(self):
        return self._module.config

    def generate(self, *args, **kwargs):
        """Outside a trace: the wrapped model's own ``generate`` (text is encoded)."""
        if args and not isinstance(args[0], torch.Tensor):
            enc = self._encode(args[0])
            enc.pop("position_ids", None)
            return self._module.generate(**enc, **kwargs)
        return self._module.generate(*args, **kwargs)

    # -- inputs ----------------------------------------------------------------------
    def _device(self) -> torch.device:
        try:
            return next(self._module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _encode(self, inputs: Any) -> dict:
        enc = encode(self.tokenizer, inputs)
        device = self._device()
        return {k: v.to(device) for k, v in enc.items()}

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) != 1:
            raise TypeError(
                f"a LanguageModel trace takes one input (a prompt, a list of prompts, token "
                f"ids or a dict with input_ids); got {len(args)} positional arguments"
            )
        return (), {**self._encode(args[0]), **kwargs}

    def _batch(self, inputs: list) -> tuple[tuple, dict, list]:
        encoded = []
        for index, item in enumerate(inputs):
            if item is None:
                encoded.append(None)
                continue
            args, kwargs = item
            if len(args) != 1 or kwargs:
                raise TypeError(
                    f"invoke {index}: `tracer.invoke(...)` takes one input (a prompt, a list "
                    "of prompts, token ids or a dict with input_ids)"
                )
            encoded.append(self._encode(args[0]))
        given = [e for e in encoded if e is not None]
        if not given:
            raise ValueError(
                "every invoke of this trace is `tracer.invoke()` with no input: give at least "
                "one invoke an input"
            )
        width = max(e["input_ids"].shape[1] for e in given)
        pad_id = self._pad_id()
        ids, masks, rows = [], [], []
        start = 0
        for e in encoded:
            if e is None:
                rows.append(None)
                continue
            n, length = e["input_ids"].shape
            pad = width - length
            ids.append(torch.nn.functional.pad(e["input_ids"], (pad, 0), value=pad_id))
            masks.append(torch.nn.functional.pad(e["attention_mask"], (pad, 0), value=0))
            rows.append(slice(start, start + n))
            start += n
        input_ids = torch.cat(ids)
        attention_mask = torch.cat(masks)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return (), {"input_ids": input_ids, "attention_mask": attention_mask,
                    "position_ids": position_ids}, rows

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None and tok is not None:
            pad = getattr(tok, "eos_token_id", None)
        return 0 if pad is None else int(pad)

    # -- running ------------------------------------------------------------------------
    def _run(self, kind: str, args: tuple, kwargs: dict, tracer) -> Any:
        if kind == "trace":
            return self._module(*args, **kwargs)
        if kind == "generate":
            # generate derives positions from the mask itself, step by step.
            kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
            return self._module.generate(*args, **kwargs)
        return super()._run(kind, args, kwargs, tracer)
