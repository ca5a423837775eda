"""The wire format of remote blocks: JSON for everything but tensors, safetensors for those.

A message is ``MAGIC``, the JSON header's length (8 bytes, little endian), the
header (UTF-8 JSON) and a safetensors blob holding every tensor the header
refers to.  Values are encoded as a small tagged tree: ``None``, booleans,
ints, floats and strings as themselves; lists, tuples, dicts, ``torch.Size``,
dtypes, devices, slices, tensors (with ``requires_grad`` and ``.grad``), and,
for results, ``tracer.cache()`` caches and transformers' ``ModelOutput``s as
``{"t": tag, ...}``.  Anything else is refused with an error naming where it
was.  Nothing is ever pickled or ``torch.load``ed, in either direction: the
decoder builds only these types.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"IVR1"
_MAX_DEPTH = 64

ALLOWED = (
    "tensors, numbers, strings, booleans, None, and lists / tuples / dicts of them"
)


class ProtocolError(ValueError):
    """A message that is not in this protocol (or was cut short)."""


class UnsendableError(TypeError):
    """A value that cannot travel; the message names where it was."""


def _torch():
    import torch

    return torch


# -- framing ----------------------------------------------------------------------------
def pack(header: dict, tensors: dict | None = None) -> bytes:
    """One message: the header and the tensors it refers to by key."""
    blob = b""
    if tensors:
        from safetensors.torch import save

        blob = save(tensors)
    head = json.dumps(header, separators=(",", ":"), allow_nan=True).encode("utf-8")
    return MAGIC + struct.pack("<Q", len(head)) + head + blob


def read_header(data: bytes) -> dict:
    """Only the header of a message (its tensors are not read)."""
    return _header(data)[0]


def _header(data: bytes) -> tuple[dict, int]:
    if len(data) < 12 or data[:4] != MAGIC:
        raise ProtocolError("not an intervene remote message (bad magic)")
    (n,) = struct.unpack("<Q", data[4:12])
    if 12 + n > len(data):
        raise ProtocolError("message cut short (header)")
    try:
        header = json.loads(data[12 : 12 + n].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"bad message header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad message header: not a JSON object")
    return header, 12 + n


def unpack(data: bytes) -> tuple[dict, dict]:
    """The header and tensors of a message made by ``pack``."""
    header, end = _header(data)
    blob = data[end:]
    tensors: dict = {}
    if blob:
        from safetensors.torch import load

        try:
            tensors = load(bytes(blob))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ProtocolError(f"bad tensor data: {exc}") from None
    return header, tensors


# -- the stream of one job (POST /v1/run) ------------------------------------------------
# The response of ``POST /v1/run`` is a sequence of frames: a tag byte, the body's length
# (8 bytes, little endian), the body.  ``S`` a status (JSON; the first one carries the
# job's id), ``P`` print output (JSON ``{"text": ...}``), ``R`` the result (a message as
# made by ``pack``), which ends the stream like a final ``S`` (ERROR, CANCELLED) does.
STREAM_TYPE = "application/x-intervene-frames"
_FRAME = struct.Struct("<cQ")


def frame_head(tag: bytes, size: int) -> bytes:
    return _FRAME.pack(tag, size)


def frame(tag: bytes, body: bytes) -> bytes:
    return _FRAME.pack(tag, len(body)) + body


def read_frames(chunks):
    """``(tag, body)`` for each whole frame in an iterable of byte chunks; a stream that
    ends inside a frame raises ``ProtocolError``."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= _FRAME.size:
            tag, n = _FRAME.unpack_from(buf)
            end = _FRAME.size + n
            if len(buf) < end:
                break
            yield tag, bytes(memoryview(buf)[_FRAME.size:end])
            del buf[:end]
    if buf:
        raise ProtocolError("the server's stream ended inside a frame")


# -- values -------------------------------------------------------------------------------
class Encoder:
    """Turns values into the tagged tree, collecting tensors into ``self.tensors``.

    ``lenient``: a value that cannot travel becomes ``{"t": "dropped"}`` (read back
    as None) instead of an error; used for the entries of a cache, where a
    module's output may hold a transformers KV-cache object."""

    def __init__(self) -> None:
        self.tensors: dict = {}
        self._seen: dict[int, str] = {}
        self._keep: list = []  # keeps ids in _seen valid while encoding
        self._storages: set[int] = set()  # safetensors refuses two tensors on one storage

    def encode(self, value: Any, where: str, lenient: bool = False, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise UnsendableError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if type(value) is int or isinstance(value, bool) else int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {"t": "float", "v": repr(float(value))}
        torch = _torch()
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, torch.Size):
            return {"t": "size", "v": list(value)}
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, slice):
            return {"t": "slice", "v": [self.encode(getattr(value, a), f"{where}.{a}", lenient,
                                                    depth + 1) for a in ("start", "stop", "step")]}
        if value is Ellipsis:
            return {"t": "ellipsis"}
        kind = type(value).__name__
        mapping = _model_output(value)
        if mapping is not None or isinstance(value, dict):
            items = list(value.items())
            out = {
                "t": "dict" if mapping is None else "modeloutput",
                "k": [self.encode(k, f"{where} (a key)", lenient, depth + 1) for k, _ in items],
                "v": [self.encode(v, f"{where}[{k!r}]", lenient, depth + 1) for k, v in items],
            }
            if mapping is not None:
                out["cls"] = kind
            return out
        if isinstance(value, (list, tuple)):
            tag = "list" if isinstance(value, list) else "tuple"
            return {"t": tag, "v": [self.encode(v, f"{where}[{i}]", lenient, depth + 1)
                                    for i, v in enumerate(value)]}
        if _is_cache(value):
            return self._cache(value, where)
        if lenient:
            return {"t": "dropped", "type": kind}
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise UnsendableError(f"{where} is {article} {kind}: a remote block can send and "
                              f"return {ALLOWED}")

    def _tensor(self, t, where: str) -> dict:
        torch = _torch()
        key = self._seen.get(id(t))
        if key is None:
            if t.is_sparse or t.layout != torch.strided:
                raise UnsendableError(f"{where} is a sparse tensor: send it dense (`.to_dense()`)")
            if t.device.type == "meta" or type(t).__name__ == "FakeTensor":
                raise UnsendableError(
                    f"{where} is a tensor without data ({t.device.type}): save its `.shape` instead"
                )
            data = t.detach()
            if data.device.type != "cpu":
                data = data.cpu()
            if (data._base is not None or data.storage_offset() or not data.is_contiguous()
                    or data.untyped_storage().nbytes() != data.numel() * data.element_size()
                    or data.untyped_storage().data_ptr() in self._storages):
                data = data.clone(memory_format=torch.contiguous_format)
            self._storages.add(data.untyped_storage().data_ptr())
            key = str(len(self.tensors))
            self.tensors[key] = data
            self._seen[id(t)] = key
            self._keep.append(t)
        out: dict = {"t": "tensor", "k": key}
        if t.requires_grad:
            out["rg"] = True
        if (t.is_leaf or t.retains_grad) and t.grad is not None:
            out["g"] = self._tensor(t.grad, f"{where}.grad")
        return out

    def _cache(self, cache, where: str) -> dict:
        """``tracer.cache()``: its ``exported()`` values, for ``Cache.rebuilt``."""
        def call(path, out, inputs):
            label = f"{where}[{path!r}]"
            return [self.encode(out, f"{label}.output", True),
                    None if inputs is None else self.encode(inputs, f"{label}.inputs", True)]

        return {
            "t": "cache",
            "per_step": bool(cache._per_step),
            "inputs": bool(cache._include_inputs),
            "chosen": bool(getattr(cache, "_chosen", False)),
            "entries": [[path, [[int(step), [call(path, o, i) for o, i in calls]]
                                for step, calls in items]]
                        for path, items in cache.exported().items()],
        }


def _model_output(value) -> Any:
    cls = type(value)
    for base in cls.__mro__:
        if base.__name__ == "ModelOutput" and base.__module__.startswith("transformers"):
            return value
    return None


def _is_cache(value) -> bool:
    cls = type(value)
    return cls.__name__ == "Cache" and cls.__module__ == "runtime.cache"


def decode(node: Any, tensors: dict, root: Any = None, depth: int = 0) -> Any:
    """The value of an encoded tree; ``root`` is the model a decoded cache belongs to."""
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"value nested more than {_MAX_DEPTH} levels deep")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise ProtocolError(f"bad value node: {str(node)[:80]}")
    tag = node["t"]
    torch = _torch()
    d = depth + 1
    if tag == "tensor":
        try:
            t = tensors[node["k"]]
        except (KeyError, TypeError):
            raise ProtocolError(f"value refers to a missing tensor {node.get('k')!r}") from None
        if node.get("rg") and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        if node.get("g") is not None:
            t.grad = decode(node["g"], tensors, root, d)
        return t
    if tag in ("list", "tuple"):
        items = [decode(v, tensors, root, d) for v in _list(node, "v")]
        return items if tag == "list" else tuple(items)
    if tag in ("dict", "modeloutput"):
        keys = [decode(k, tensors, root, d) for k in _list(node, "k")]
        values = [decode(v, tensors, root, d) for v in _list(node, "v")]
        if len(keys) != len(values):
            raise ProtocolError("bad dict node: keys and values differ in number")
        try:
            out = dict(zip(keys, values))
        except TypeError:
            raise ProtocolError("bad dict node: a key that is not hashable") from None
        if tag == "modeloutput":
            return _rebuild_output(node.get("cls"), out)
        return out
    if tag == "size":
        return torch.Size([int(v) for v in _list(node, "v")])
    if tag == "dtype":
        dtype = getattr(torch, str(node.get("v")), None)
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"unknown dtype {node.get('v')!r}")
        return dtype
    if tag == "device":
        return torch.device(str(node.get("v")))
    if tag == "float":
        return float(str(node.get("v")))
    if tag == "slice":
        parts = _list(node, "v")
        if len(parts) != 3:
            raise ProtocolError("bad slice node")
        return slice(*(decode(v, tensors, root, d) for v in parts))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dropped":
        return None
    if tag == "cache":
        return _rebuild_cache(node, tensors, root, d)
    raise ProtocolError(f"unknown value tag {tag!r}")


def _list(node: dict, key: str) -> list:
    value = node.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"bad {node.get('t')} node: {key!r} is not a list")
    return value


def _rebuild_output(name: Any, fields: dict) -> Any:
    try:
        from transformers import modeling_outputs
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover - transformers is a dependency
        return fields
    cls = getattr(modeling_outputs, str(name), None)
    if isinstance(cls, type) and issubclass(cls, ModelOutput):
        return cls(**fields)
    return fields


def _rebuild_cache(node: dict, tensors: dict, root: Any, depth: int) -> Any:
    """A ``tracer.cache()`` result, rebuilt against ``root`` (its module tree checks
    the paths the user navigates)."""
    from runtime.cache import Cache

    d = depth + 1
    entries: dict = {}
    for item in _list(node, "entries"):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], list)):
            raise ProtocolError("bad cache entry")
        steps = []
        for step in item[1]:
            if not (isinstance(step, list) and len(step) == 2 and isinstance(step[0], int)
                    and isinstance(step[1], list) and step[1]):
                raise ProtocolError("bad cache entry")
            calls = []
            for call in step[1]:
                if not (isinstance(call, list) and len(call) == 2):
                    raise ProtocolError("bad cache entry")
                calls.append((decode(call[0], tensors, root, d),
                              None if call[1] is None else decode(call[1], tensors, root, d)))
            steps.append((step[0], calls))
        entries[item[0]] = steps
    cache = Cache.rebuilt(root, bool(node.get("per_step")), bool(node.get("inputs")), entries)
    cache._chosen = bool(node.get("chosen"))
    return cache


def encode_values(values: dict, where: dict[str, str] | None = None,
                  enc: Encoder | None = None) -> tuple[dict, dict]:
    """``{name: value}`` -> ``({name: tree}, tensors)``; ``where[name]`` says how to
    name a value in an error (default: "variable `name`"); ``enc``: an Encoder to
    collect the tensors into (one that more values will go through), else a new one."""
    enc = Encoder() if enc is None else enc
    out = {}
    for name, value in values.items():
        label = (where or {}).get(name) or f"variable `{name}`"
        out[name] = enc.encode(value, label)
    return out, enc.tensors


def decode_values(trees: Any, tensors: dict, root: Any = None) -> dict:
    if not isinstance(trees, dict):
        raise ProtocolError("bad values: not a JSON object")
    return {str(k): decode(v, tensors, root) for k, v in trees.items()}
