"""The worker process: one served model, one job at a time.

Started with ``multiprocessing`` (spawn) by the engine.  It loads the model,
says it is ready, then runs the jobs it is sent (``execute.run_job``), one at
a time.  Only bytes cross the pipe, never pickles: a job is the client's
request message as received; each reply is one tag byte and a body:

- ``Y`` ready (JSON: the model's names), ``F`` failed to load (JSON),
- ``P`` print output of the running job (UTF-8 text),
- ``R`` the job's result (the reply message for the client),
- ``E`` the job's error (JSON: type, message, line, ...).

After each job the model is checked (``ModelGuard``); a job that changed it
fails, and the worker exits so the engine starts a fresh one with the model
loaded again from its files.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TINY = "tiny-llama"  # a small random Llama, for tests (token ids in, no tokenizer)


def load_model(spec: str):
    """The served model for ``--model SPEC``, with weights loaded."""
    from runtime.language import LanguageModel

    if spec == TINY:
        from runtime.models import tiny_llama

        model = LanguageModel(tiny_llama(0))
    else:
        model = LanguageModel(spec, dispatch=True)
    # No job can accumulate gradients into the served weights (a block's own
    # `x.requires_grad = True` still works, as it does for any model).
    for p in model._module.parameters():
        p.requires_grad_(False)
    return model


def names_for(spec: str, model: Any = None) -> list[str]:
    """The names a client may use for this model: as given to ``--model``, the
    folder's name, and the checkpoint's own name."""
    names = [spec]
    base = os.path.basename(os.path.normpath(spec))
    if base and base not in names:
        names.append(base)
    config = getattr(getattr(model, "_module", None), "config", None)
    own = getattr(config, "_name_or_path", None)
    if own and own not in names:
        names.append(str(own))
    return names


class _Printer:
    """``print`` inside a job: the text goes to the client, up to ``limit`` bytes."""

    def __init__(self, send, limit: int) -> None:
        self.send = send
        self.limit = limit
        self.used = 0
        self.cut = False

    def __call__(self, *args, sep=" ", end="\n", file=None, flush=False) -> None:
        if self.cut:
            return
        text = (" " if sep is None else str(sep)).join(str(a) for a in args)
        text += "\n" if end is None else str(end)
        data = text.encode("utf-8", "replace")
        if self.used + len(data) > self.limit:
            data = data[: max(self.limit - self.used, 0)]
            data += f"\n[intervene: print output over {self.limit} bytes; the rest is dropped]\n".encode()
            self.cut = True
        self.used += len(data)
        self.send(b"P" + data)


def _limit_memory(extra: int) -> None:
    """Let this process map at most ``extra`` more bytes than it holds now (the model
    loaded): a job's huge allocation then fails as a MemoryError / RuntimeError of
    that job instead of taking the machine's memory."""
    import resource

    with open("/proc/self/status", encoding="ascii") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def main(conn, spec: str, max_result: int, max_print: int, max_memory: int | None = None,
         ) -> None:
    """The worker's loop (the spawn target)."""
    from runtime.remote import protocol

    from .execute import JobError, ModelGuard, run_job

    def send(data: bytes) -> None:
        conn.send_bytes(data)

    try:
        import torch

        model = load_model(spec)
        guard = ModelGuard(model._module)
    except BaseException as exc:  # noqa: BLE001 - reported, then the worker ends
        send(b"F" + json.dumps({"message": f"{type(exc).__name__}: {exc}"}).encode())
        return
    if max_memory:
        _limit_memory(max_memory)
    send(b"Y" + json.dumps({"names": names_for(spec, model)}).encode())
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server went away
        grad = torch.is_grad_enabled()
        try:
            header, tensors = protocol.unpack(data)
            reply = run_job(model, header, tensors, _Printer(send, max_print), max_result)
        except JobError as exc:
            result = b"E" + json.dumps(exc.info, default=str).encode()
        except protocol.ProtocolError as exc:
            result = b"E" + json.dumps({"type": "ProtocolError", "message": str(exc)}).encode()
        except BaseException as exc:  # noqa: BLE001 - a bug of ours, not the user's
            result = b"E" + json.dumps({"type": type(exc).__name__,
                                        "message": f"server error: {exc}"}).encode()
        else:
            result = b"R" + reply
        finally:
            torch.set_grad_enabled(grad)
        changes = guard.changes()
        if changes:
            message = (
                "the job changed the served model (" + "; ".join(changes) + "); writes "
                "through .output/.input are the only writes a job may make. The model is "
                "being reloaded for the next job."
            )
            send(b"E" + json.dumps({"type": "RuntimeError", "message": message}).encode())
            sys.exit(3)
        send(result)
