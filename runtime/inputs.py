"""Encoding model inputs: :func:`encode`, and the one left padding everything uses.

:func:`encode` turns text or token ids into left-padded model inputs (``input_ids``,
``attention_mask``, ``position_ids``) whose rows give the same logits as each prompt alone.
:func:`left_pad` is the only padding code: ``encode`` pads ragged rows with it, and
``LanguageModel`` merges its invokes' encoded inputs into one batch with it. The tokenizer
only tokenizes, each prompt on its own: its own padding cannot pad ids without a tokenizer,
pads nothing without a pad token, and knows no ``position_ids``, so one function of ours
serves every case.

Importing this module is cheap: torch is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ENCODED_KEYS", "encode", "left_pad", "pad_id"]

_ACCEPTED_INPUTS = (
    "a str; a list of str; token ids as list[int] or list[list[int]] (ragged rows are "
    "left-padded); a 1-D or 2-D integer torch.Tensor; or a dict/BatchEncoding with "
    "'input_ids' (and optionally 'attention_mask', 'position_ids' and any other input the "
    "model's forward takes, such as 'token_type_ids' or 'decoder_input_ids')"
)
# The keys encode() itself pads and checks; any other key of a dict input travels as given.
ENCODED_KEYS = ("input_ids", "attention_mask", "position_ids")


# --------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------


def pad_id(tokenizer: Any) -> int:
    """The id padding fills ``input_ids`` with: the tokenizer's pad token, else its eos
    token, else 0 (also when ``tokenizer`` is None)."""
    if tokenizer is not None:
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int):
                return value
    return 0


def left_pad(blocks: Sequence[torch.Tensor], fill: int) -> torch.Tensor:
    """2-D blocks of rows (rows x tokens), each widened on the left with ``fill`` to the
    widest block's width, then stacked into one batch (concatenated along dim 0).

    Left padding keeps every row's last token in the last column, so batched last-token
    logits line up with each prompt run alone."""
    import torch

    width = max(block.shape[1] for block in blocks)
    return torch.cat(
        [torch.nn.functional.pad(block, (width - block.shape[1], 0), value=fill)
         for block in blocks]
    )


def _pad_rows(rows: Sequence[Sequence[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of ids -> (left-padded 2-D long ids, the mask of their real tokens)."""
    import torch

    blocks = [torch.tensor([list(row)], dtype=torch.long) for row in rows]
    return left_pad(blocks, fill), left_pad([torch.ones_like(b) for b in blocks], 0)


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids_to_tensors(ids: Any, fill: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids in any accepted form -> (2-D long ids, mask or None when nothing was padded)."""
    import torch

    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"token id tensors must have an integer dtype, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"token id tensors must be 1-D or 2-D, got shape {tuple(ids.shape)}")
        return ids.long(), None
    if isinstance(ids, (list, tuple)) and ids:
        if all(_is_int(x) for x in ids):
            return torch.tensor([list(ids)], dtype=torch.long), None
        if all(isinstance(r, (list, tuple)) and all(_is_int(x) for x in r) for r in ids):
            if not any(ids):
                raise ValueError("cannot encode rows that are all empty")
            if len({len(r) for r in ids}) == 1:
                return torch.tensor([list(r) for r in ids], dtype=torch.long), None
            return _pad_rows(ids, fill)
    raise TypeError(f"cannot encode {_describe(ids)}; accepted inputs: {_ACCEPTED_INPUTS}")


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        inner = sorted({type(x).__name__ for x in value})
        return f"a {type(value).__name__} of {'/'.join(inner)}"
    return f"a value of type {type(value).__name__}"


def _mask_tensor(mask: Any) -> torch.Tensor:
    import torch

    # Masks come as long, bool or float tensors (or nested lists); 1/True marks a real token.
    if isinstance(mask, torch.Tensor):
        tensor = mask
    elif mask and all(isinstance(row, (list, tuple)) for row in mask):
        # Ragged rows, like ragged input_ids, are left-padded to the same width.
        tensor = _pad_rows([[int(v) for v in row] for row in mask], 0)[0]
    else:
        tensor = torch.tensor(mask)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    return (tensor != 0).long()


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Count real tokens only, so a left-padded row sees positions 0, 1, ... exactly as the
    # prompt would alone (pads get 0; they are masked out anyway).
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode(tokenizer: Any, inputs: Any) -> dict[str, torch.Tensor]:
    """Turn text or token ids into ``input_ids``, ``attention_mask`` and ``position_ids``.

    All three are 2-D LongTensors; every other key of a dict input is returned too, as
    given (lists become tensors; a 1-D value of a 1-D input gets a batch dimension).
    An input without tokens (``""``, a row whose mask is all 0) is a ValueError. Several
    prompts are left-padded with :func:`pad_id` (the tokenizer's pad token, else its eos
    token, else 0), and ``position_ids`` restart at 0 on each row's first real token, so
    each row gives the same logits as its prompt alone. A single
    string is tokenized exactly like ``tokenizer(text, return_tensors="pt")``. ``tokenizer``
    may be None when ``inputs`` are token ids already.
    """
    import torch

    fill = pad_id(tokenizer)
    position_ids: torch.Tensor | None = None
    extras: dict[str, Any] = {}

    if isinstance(inputs, str):
        _require_tokenizer(tokenizer)
        batch = tokenizer(inputs, return_tensors="pt")
        input_ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        attention_mask = mask.long() if mask is not None else torch.ones_like(input_ids)
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs):
        _require_tokenizer(tokenizer)
        # Tokenize each prompt on its own and pad here, so every row holds exactly the ids
        # the prompt gets alone, whatever padding settings the tokenizer carries.
        rows = [tokenizer(text)["input_ids"] for text in inputs]
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(
                f"prompt {empty[0]} of the list ({inputs[empty[0]]!r}) encodes to no tokens: "
                "every prompt needs at least one token"
            )
        input_ids, attention_mask = _pad_rows(rows, fill)
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise TypeError(
                f"a dict input needs an 'input_ids' entry; accepted inputs: {_ACCEPTED_INPUTS}"
            )
        input_ids, padded_mask = _ids_to_tensors(inputs["input_ids"], fill)
        given_mask = inputs.get("attention_mask")
        if given_mask is not None:
            attention_mask = _mask_tensor(given_mask)
        elif padded_mask is not None:
            attention_mask = padded_mask
        else:
            attention_mask = torch.ones_like(input_ids)
        given_positions = inputs.get("position_ids")
        if given_positions is not None:
            position_ids, _ = _ids_to_tensors(given_positions, 0)
        one_row = _is_one_row(inputs["input_ids"])
        for key, value in inputs.items():
            if key not in ENCODED_KEYS:
                extras[key] = _extra_tensor(value, one_row)
    else:
        input_ids, padded_mask = _ids_to_tensors(inputs, fill)
        attention_mask = padded_mask if padded_mask is not None else torch.ones_like(input_ids)

    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
            f"shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        what = "the prompt" if isinstance(inputs, str) else "the input"
        raise ValueError(
            f"{what} has no tokens (input_ids of shape {tuple(input_ids.shape)}): give at "
            "least one token"
        )
    empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"row {empty_rows[0]} of the input has no tokens (its attention_mask is all 0): "
            "every row needs at least one token"
        )
    if position_ids is None:
        position_ids = _position_ids(attention_mask)
    elif position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids shape {tuple(position_ids.shape)} does not match input_ids "
            f"shape {tuple(input_ids.shape)}"
        )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        **extras,
    }


def _is_one_row(ids: Any) -> bool:
    import torch

    if isinstance(ids, torch.Tensor):
        return ids.dim() == 1
    return isinstance(ids, (list, tuple)) and bool(ids) and all(_is_int(x) for x in ids)


def _extra_tensor(value: Any, one_row: bool) -> Any:
    """Another input of a dict (``token_type_ids``, ``decoder_input_ids``): lists of
    numbers become tensors, and a 1-D value of a 1-D input gets the batch dimension."""
    import torch

    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], torch.Tensor):
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError):
            return value
    if one_row and isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.unsqueeze(0)
    return value


def _require_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError("encoding text needs a tokenizer; pass token ids when it is None")
