"""``LanguageModel``: a transformers model (causal LMs; encoders and encoder-decoders
such as BERT and T5 too), ready for traces and generation.

Inputs (text, lists of prompts, token ids, dicts) are encoded by
``runtime.inputs.encode``: left-padded, masked and with matching position
ids, so every row gives what its prompt gives alone.  Several invokes are
merged into one batch by the same left padding (``runtime.inputs.left_pad``);
each invoke sees its own rows.  Every other input (dict keys, keywords) goes
to the model if its ``forward`` takes it and is refused by name otherwise;
position ids go only to a forward that names them.
``generate`` blocks run the model's own ``generate``: step k is its k-th
forward call.
"""

from __future__ import annotations

import inspect
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any

import torch

from .envoy import Envoy
from .inputs import ENCODED_KEYS, encode, left_pad, pad_id
from .loading import load_causal_lm, loading_keywords
from .nnsight import NNsight, invoke_name, merge_keyword, unwrap

# Inputs that stand for the tokens: given without input_ids, they pass as given.
_OTHER_INPUTS = ("inputs_embeds", "pixel_values", "input_features", "input_values",
                 "encoder_outputs")
# Extra inputs with one entry per token: left-padded like input_ids when invokes batch.
_TOKEN_ALIGNED = frozenset({"token_type_ids"})
# Keywords transformers' wrappers take around every forward that has **kwargs.
_GENERIC = frozenset({"return_dict", "output_attentions", "output_hidden_states", "use_cache"})


class _Streamer(torch.nn.Module):
    """``model.generator.streamer``: called with the token ids ``generate`` picks at each
    step (one per row), so ``model.generator.streamer.output`` in a step block is that
    step's new tokens.  What a lane writes there is what a user's ``streamer=`` gets."""

    def forward(self, ids):
        return ids


class _Generator(torch.nn.Module):
    """Stands for the generation loop: ``model.generator.output`` is the full
    sequence of token ids, available once generation has ended."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = _Streamer()

    def forward(self, ids):  # pragma: no cover - never called
        return ids


class _StreamTo:
    """The streamer ``generate`` gets in a generate block: each step's new tokens go
    through ``model.generator.streamer`` (the prompt, which generate hands a streamer
    first, does not), then to the user's own ``streamer=`` if any (prompt included)."""

    def __init__(self, module: torch.nn.Module, user: Any) -> None:
        self.module = module
        self.user = user
        self.prompt = True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
        else:
            value = self.module(value)
        if self.user is not None:
            self.user.put(value)

    def end(self) -> None:
        if self.user is not None:
            self.user.end()


class LanguageModel(NNsight):
    """``LanguageModel(source, *, tokenizer=None, device_map=None, dispatch=False,
    dtype=None, **from_pretrained_kwargs)``.

    ``source``: a local checkpoint folder, a hub id already in the local cache,
    a built ``PreTrainedModel`` (pass ``tokenizer=``), or ``"smollm2-135m"``.
    """

    __slots__ = ("_generator", "tokenizer")
    _pending = None  # (source, dtype) while the weights are not loaded (runtime.lazy)
    _remote_name = None

    def _load(self) -> None:
        """Load the weights now, into the module tree built without them."""
        pending = self._pending
        if pending is None:
            return
        first = next(self._module.parameters(), None)
        if first is not None and not first.is_meta:
            # Another wrapper of the same module loaded it (LanguageModel(lm), model.edit()).
            object.__setattr__(self, "_pending", None)
            return
        from .lazy import materialize

        real, _ = load_causal_lm(pending[0], tokenizer=self.tokenizer, dtype=pending[1])
        materialize(self._module, real)
        object.__setattr__(self, "_pending", None)

    def __call__(self, *args, **kwargs):
        from .tracer import root_state

        self._load()
        with root_state(self).lock:  # waits for another thread's trace of this model
            return self._module(*args, **kwargs)

    def __init__(
        self,
        source: Any,
        *,
        tokenizer: Any = None,
        device_map: Any = None,
        dispatch: bool = False,
        dtype: Any = None,
        rename: dict[str, str] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        from .lazy import can_defer, meta_causal_lm

        if isinstance(source, LanguageModel):
            # LanguageModel(LanguageModel(...)): the same model, tokenizer and lazy load.
            if tokenizer is None:
                tokenizer = source.tokenizer
            pending, remote_name = source._pending, source._remote_name
            if pending is not None and (dtype is not None or device_map is not None
                                        or dispatch or from_pretrained_kwargs):
                source._load()  # loading settings apply to loaded weights
                pending = None
            source = source._module
        else:
            pending = remote_name = None
            source = unwrap(source)  # LanguageModel(NNsight(net)) / a part of a wrapper

        # nnsight's keywords: torch_dtype= is dtype=; device_map="auto"/"cpu" on a CPU-only
        # machine is no device map (the load stays lazy).
        dtype, device_map, from_pretrained_kwargs = loading_keywords(
            dtype, device_map, from_pretrained_kwargs
        )
        if not dispatch and can_defer(source, device_map, from_pretrained_kwargs):
            # Config and tokenizer only; the weights load when a local block needs them.
            model, tok = meta_causal_lm(source, tokenizer, dtype)
        else:
            model, tok = load_causal_lm(
                source, tokenizer=tokenizer, device_map=device_map, dtype=dtype,
                **from_pretrained_kwargs,
            )
        super().__init__(model, rename=rename)
        if pending is not None:
            object.__setattr__(self, "_pending", pending)
        if remote_name is not None:
            object.__setattr__(self, "_remote_name", remote_name)
        if isinstance(source, (str, os.PathLike)):
            object.__setattr__(self, "_remote_name", str(source))  # what a server knows
            if not dispatch and can_defer(source, device_map, from_pretrained_kwargs):
                object.__setattr__(self, "_pending", (source, dtype))
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
        """``with model.generate(...):`` outside @intervene: compiled on entry
        (runtime/direct.py); called plainly: the wrapped model's own ``generate``."""
        from .direct import DirectTracer, opens_with

        if opens_with(sys._getframe(1)):
            return DirectTracer(self, "generate", args, kwargs)
        from .tracer import root_state

        self._load()
        with root_state(self).lock:  # waits for another thread's trace of this model
            if args and not isinstance(args[0], torch.Tensor):
                enc = self._encode(args[0])
                enc.pop("position_ids", None)
                return self._module.generate(**enc, **kwargs)
            return self._module.generate(*args, **kwargs)

    # -- what the forward takes ------------------------------------------------------
    def _forward_inputs(self) -> tuple[tuple, frozenset]:
        """(the forward's named parameters, every keyword it uses): a keyword in neither
        would be swallowed by ``**kwargs`` and ignored."""
        return forward_inputs(self._module)

    def _check_keywords(self, kind: str, kwargs: dict) -> None:
        named, accepted = self._forward_inputs()
        unknown = [k for k in kwargs if k not in accepted]
        if not unknown:
            return
        more = sorted(accepted - set(named))
        others = f" (and transformers' own keywords: {', '.join(more)})" if more else ""
        hint = ""
        if kind == "trace":
            hint = (" Generation settings (max_new_tokens, do_sample, ...) belong in "
                    "`model.generate(...)`.")
        raise TypeError(
            f"`model.{kind}(...)`: {type(self._module).__name__}.forward does not take "
            f"{', '.join(f'`{k}`' for k in unknown)} (transformers would ignore "
            f"{'it' if len(unknown) == 1 else 'them'} silently).{hint} It takes: "
            f"{', '.join(named)}{others}"
        )

    # -- inputs ----------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self._pending is not None:
            return torch.device("cpu")  # where the weights will load
        try:
            return next(self._module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _encode(self, inputs: Any) -> dict:
        enc = encode(self.tokenizer, inputs)
        explicit = isinstance(inputs, Mapping) and inputs.get("position_ids") is not None
        if not explicit and "position_ids" not in self._forward_inputs()[0]:
            # Positions we made ourselves go only to a forward that names them (several
            # transformers 4.x causal LMs refuse them; they derive positions from the mask).
            del enc["position_ids"]
        self._check_vocabulary(enc["input_ids"])
        device = self._device()
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}

    def _check_vocabulary(self, ids: torch.Tensor) -> None:
        embeddings = getattr(self._module, "get_input_embeddings", None)
        size = getattr(embeddings() if embeddings is not None else None, "num_embeddings", None)
        if size is None:
            size = getattr(getattr(self._module, "config", None), "vocab_size", None)
        if not isinstance(size, int) or ids.numel() == 0:
            return
        bad = ((ids < 0) | (ids >= size)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            raise ValueError(
                f"token id {int(ids[row, col])} (row {row}, position {col}) is outside the "
                f"vocabulary of {type(self._module).__name__}: ids go from 0 to {size - 1}"
            )

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """One input, positional (a prompt, prompts, token ids, a dict) or as keywords
        (``input_ids=``, ``attention_mask=``, ``position_ids=``); other keywords pass on."""
        if len(args) > 1:
            raise TypeError(
                f"a LanguageModel trace takes one input (a prompt, a list of prompts, token "
                f"ids or a dict with input_ids); got {len(args)} positional arguments"
            )
        kwargs = dict(kwargs)
        # The inputs `encode` pads and checks, given as keywords (`model.trace(input_ids=...)`),
        # are encoded like a dict input.
        given = {k: kwargs.pop(k) for k in ENCODED_KEYS if k in kwargs}
        if args:
            if given:
                raise TypeError(
                    f"the input is given twice: positionally and as `{next(iter(given))}=`; "
                    "pass it one way"
                )
            inputs = args[0]
        elif "input_ids" in given:
            inputs = given
        elif given:
            raise TypeError(
                f"`{next(iter(given))}=` is given without `input_ids=`: pass the token ids "
                "too (or the input positionally)"
            )
        elif any(k in kwargs for k in _OTHER_INPUTS):
            return (), kwargs  # inputs_embeds=, pixel_values=, ...: passed as given
        else:
            got = f" (only the keywords {', '.join(sorted(kwargs))})" if kwargs else ""
            raise TypeError(
                "a LanguageModel trace takes one input (a prompt, a list of prompts, token "
                "ids, a dict with input_ids, or input_ids=... / inputs_embeds=... as a "
                f"keyword); got none{got}"
            )
        enc = self._encode(inputs)
        twice = [k for k in kwargs if k in enc]
        if twice:
            raise TypeError(f"`{twice[0]}` is given twice: in the input and as a keyword")
        return (), {**enc, **kwargs}

    def _batch(self, inputs: list, lanes=None) -> tuple[tuple, dict, list]:
        """Each invoke's input encoded on its own, then left-padded into one batch; every
        other model input (``token_type_ids``, ``decoder_input_ids``, ...) is batched too:
        token-aligned ones left-padded, the rest concatenated along dim 0."""
        encoded: list = []
        for index, item in enumerate(inputs):
            if item is None:
                encoded.append(None)
                continue
            try:
                _, enc = self._prepare(*item)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{invoke_name(index, lanes)}: {exc}") from None
            if "input_ids" not in enc:
                raise TypeError(
                    f"{invoke_name(index, lanes)}: an invoke needs an input (a prompt, token "
                    "ids or input_ids=...) to give it rows of the batch"
                )
            encoded.append((index, enc))
        given = [e for e in encoded if e is not None]
        if not given:
            raise ValueError(
                "every invoke of this trace is `tracer.invoke()` with no input: give at least "
                "one invoke an input"
            )
        first_index, first = given[0]
        for index, enc in given[1:]:
            if enc.keys() != first.keys():
                extra = sorted(enc.keys() ^ first.keys())
                raise ValueError(
                    f"{invoke_name(index, lanes)}: its model inputs {sorted(enc)} differ from "
                    f"{invoke_name(first_index, lanes)}'s {sorted(first)} (in {extra}): every "
                    "invoke with an input gives the same kinds of input"
                )
        rows: list = []
        start = 0
        for item in encoded:
            if item is None:
                rows.append(None)
                continue
            n = item[1]["input_ids"].shape[0]
            rows.append(slice(start, start + n))
            start += n
        batch: dict = {}
        for key in first:
            if key in ENCODED_KEYS or key in _TOKEN_ALIGNED:
                for index, enc in given:
                    value = enc[key]
                    if value.shape[:2] != enc["input_ids"].shape:
                        raise ValueError(
                            f"{invoke_name(index, lanes)}: `{key}` has shape "
                            f"{tuple(value.shape)} but its input_ids have "
                            f"{tuple(enc['input_ids'].shape)}"
                        )
                fill = pad_id(self.tokenizer) if key == "input_ids" else 0
                batch[key] = left_pad([enc[key] for _, enc in given], fill)
            else:
                batch[key] = merge_keyword(
                    key, [(i, enc[key], enc["input_ids"].shape[0]) for i, enc in given], lanes
                )
        return (), batch, rows

    # -- running ------------------------------------------------------------------------
    def _run(self, kind: str, args: tuple, kwargs: dict, tracer) -> Any:
        if self._pending is not None and kind != "scan":
            self._load()  # the first local block that runs the model
        if kind in ("trace", "scan"):
            self._check_keywords(kind, kwargs)
        if kind == "scan":
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and not mask.is_meta and bool(mask.all()):
                # All ones means the same as none, and transformers 4.x reads a mask's
                # values (`mask.all()`), which fake tensors cannot give.
                kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        if kind == "trace":
            return self._module(*args, **kwargs)
        if kind == "generate":
            # generate derives positions from the mask itself, step by step.
            kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
            beams = kwargs.get("num_beams") or getattr(
                getattr(self._module, "generation_config", None), "num_beams", None)
            if beams in (None, 1):  # transformers refuses streamers with beam search
                kwargs["streamer"] = _StreamTo(self._generator._module.streamer,
                                               kwargs.get("streamer"))
            return self._module.generate(*args, **kwargs)
        return super()._run(kind, args, kwargs, tracer)


_FORWARD_INPUTS: dict[Any, tuple[tuple, frozenset]] = {}


def forward_inputs(module: torch.nn.Module) -> tuple[tuple, frozenset]:
    """(named parameters of ``module.forward``, every keyword it uses).  A forward with
    ``**kwargs: Unpack[SomeTypedDict]`` uses that dict's keys (and transformers' generic
    ``return_dict``, ``output_attentions`` ...); plain ``**kwargs`` of a transformers model
    uses ``TransformersKwargs``' keys."""
    forward = type(module).forward
    got = _FORWARD_INPUTS.get(forward)
    if got is not None:
        return got
    params = inspect.signature(module.forward).parameters.values()
    named = tuple(
        p.name for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    extra: set[str] = set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        keys = None
        try:
            hints = typing.get_type_hints(forward)
        except Exception:  # noqa: BLE001 - unresolvable annotations: fall back below
            hints = {}
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                hint = hints.get(p.name, p.annotation)
                if typing.get_origin(hint) is typing.Unpack:
                    hint = typing.get_args(hint)[0]
                keys = getattr(hint, "__annotations__", None)
        if keys is None:
            try:
                from transformers.utils import TransformersKwargs

                keys = TransformersKwargs.__annotations__
            except ImportError:  # pragma: no cover - transformers 4.x without it
                keys = {}
        extra = set(keys) | _GENERIC
    got = _FORWARD_INPUTS[forward] = (named, frozenset(named) | frozenset(extra))
    return got
