"""Loading a causal language model and its tokenizer: :func:`load_causal_lm`.

It loads the default model's alias (fetched once by ``runtime.default_model``), a local
folder, a hub id (cached, else downloaded like transformers does), or wraps an already
built model; the tokenizer is set to left padding. ``runtime.lazy`` reuses the helpers to
build a model's module tree without its weights.

Importing this module is cheap: torch and transformers are imported inside the functions
that need them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .default_model import DEFAULT_ALIAS, ensure_default_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["load_causal_lm", "loading_keywords"]


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name like 'float32'")


def loading_keywords(dtype: Any, device_map: Any, kwargs: dict) -> tuple[Any, Any, dict]:
    """nnsight users' loading keywords, made ours: ``torch_dtype=`` is ``dtype=`` (both
    given and different is an error), and on a machine without CUDA a ``device_map`` of
    ``"auto"`` or ``"cpu"`` is no device map at all (everything loads on the CPU, and the
    load can stay lazy).  Returns (dtype, device_map, the other keywords)."""
    import torch

    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        legacy = kwargs.pop("torch_dtype")
        if dtype is not None and legacy is not None and _resolve_dtype(dtype) != _resolve_dtype(legacy):
            raise ValueError(
                f"both dtype={dtype!r} and torch_dtype={legacy!r} are given: pass one "
                "(torch_dtype is the older name of dtype)"
            )
        if dtype is None:
            dtype = legacy
    if device_map in ("auto", "cpu") and not torch.cuda.is_available():
        device_map = None
    return dtype, device_map, kwargs


def _move_built(model: Any, device_map: Any) -> Any:
    """``device_map=`` for an already built model: one device it is moved to, or
    ``"auto"`` (it stays where it is)."""
    import torch

    if device_map is None or device_map == "auto":
        return model
    if isinstance(device_map, Mapping):
        raise ValueError(  # noqa: TRY004 - a wrong value of device_map, as in transformers
            f"device_map={device_map!r}: an already built model cannot be split over "
            "devices; move it yourself first, or pass one device (\"cpu\", \"cuda:0\") or "
            "\"auto\" (it stays where it is)"
        )
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device_map={device_map!r} is not a device: pass one device (\"cpu\", "
            "\"cuda:0\"), or \"auto\""
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device_map={device_map!r}: CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use \"cpu\" or \"auto\""
        )
    return model.to(device)


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        return None
    # Left padding keeps every prompt's last token in the last column, so batched
    # last-token logits line up with single-prompt runs.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _location(source: str | os.PathLike[str]) -> tuple[str, Any]:
    """(folder or hub id, default dtype) for a name: the alias is the default model's
    folder (fetched on first use) in float32; a folder is itself; anything else a hub id."""
    import torch

    if str(source) == DEFAULT_ALIAS:
        return str(ensure_default_model()), torch.float32
    path = Path(source).expanduser()
    return (str(path) if path.is_dir() else str(source)), None


def _is_local(location: Any) -> bool:
    """A folder on disk (or the default model's): loaded from there, never from the hub."""
    return Path(str(location)).expanduser().is_dir()


def _missing_model_error(source: str, err: BaseException | None = None) -> FileNotFoundError:
    # transformers' own text is long and talks about its docs; ours says what was tried.
    # The original error stays reachable as __cause__.
    try:
        from huggingface_hub import constants

        offline, cache = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on it
        offline, cache = False, "the Hugging Face cache"
    looks_local = os.sep in source and (source.startswith((".", "~", os.sep)) or
                                        source.count("/") > 1)
    if offline:
        tried = ("downloading is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): "
                 "unset it to download, or download it first (`hf download "
                 f"{source}`)")
    else:
        cause = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
        tried = ("and it could not be downloaded from the Hugging Face Hub"
                 + (f" ({cause})" if cause else "")
                 + ": check the name and the network, or download it first (`hf download "
                 f"{source}`)")
    if looks_local:
        tried = "there is no such folder; " + tried
    return FileNotFoundError(
        f"cannot load model {source!r}: it is not a local folder and not in the local "
        f"Hugging Face cache ({cache}); {tried}. Or pass a local folder that contains "
        f"config.json and the weights, or use the built-in alias {DEFAULT_ALIAS!r}."
    )


def load_causal_lm(
    source: str | os.PathLike[str] | PreTrainedModel,
    *,
    tokenizer: Any = None,
    device_map: Any = None,
    dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer, in eval mode.

    ``source`` is the alias ``"smollm2-135m"`` (fetched once, then cached), a local model
    folder, a hub id (from the local Hugging Face cache, else downloaded as transformers
    does; ``HF_HUB_OFFLINE=1`` keeps it offline), or an already built model (then
    ``tokenizer`` is used as given and may be None). ``tokenizer`` may be a tokenizer
    object or a folder/hub id to load it from; by default it is loaded from the model's
    folder. ``dtype`` is a torch dtype or a name such as
    ``"bfloat16"``; the alias defaults to float32. The tokenizer is set to left padding,
    with the eos token as pad token if it has none.
    """
    import torch

    if isinstance(source, torch.nn.Module):
        dtype, _, from_pretrained_kwargs = loading_keywords(dtype, None, from_pretrained_kwargs)
        torch_dtype = _resolve_dtype(dtype)
        model = source
        if torch_dtype not in (None, "auto"):
            model = model.to(dtype=torch_dtype)
        model = _move_built(model, device_map)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(tokenizer)
        return model.eval(), _prepare_tokenizer(tokenizer)

    dtype, device_map, from_pretrained_kwargs = loading_keywords(
        dtype, device_map, from_pretrained_kwargs
    )
    torch_dtype = _resolve_dtype(dtype)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be the alias {DEFAULT_ALIAS!r}, a folder, a hub id or a model; "
            f"got {type(source).__name__}"
        )

    location, default_dtype = _location(source)
    if torch_dtype is None:
        torch_dtype = default_dtype

    from transformers import AutoModelForCausalLM

    # A folder (the default model's too) never reaches the network; a hub id loads from
    # the Hugging Face cache, else downloads as transformers does (HF_HUB_OFFLINE honoured).
    kwargs: dict[str, Any] = {"local_files_only": _is_local(location), **from_pretrained_kwargs}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as err:
        # transformers raises OSError (EnvironmentError) for a missing local folder and
        # for a hub id neither cached nor downloadable.
        raise _missing_model_error(str(source), err) from err

    if tokenizer is None:
        tokenizer = location
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    return model.eval(), _prepare_tokenizer(tokenizer)


def _load_tokenizer(location: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(location), local_files_only=_is_local(location))
    except OSError as err:
        raise _missing_model_error(str(location), err) from err
