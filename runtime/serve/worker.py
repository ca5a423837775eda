"""The worker process: one served model, one batch of jobs at a time.

Started with ``multiprocessing`` (spawn) by the engine.  It loads the model,
says it is ready, then runs the batches it is sent (``batch.run_batch``: jobs
that can share a forward pass share one).  Only bytes cross the pipe, never
pickles: a job is the client's request message as received; each reply is one
tag byte, the job's id (in a batch) and a body:

- ``Y`` ready (JSON: the model's names), ``F`` failed to load (JSON),
- ``P`` print output of the running job (UTF-8 text),
- ``R`` the job's result (the reply message for the client),
- ``E`` the job's error (JSON: type, message, line, ...),
- ``A`` run this job again, alone, on a fresh worker (a shared pass changed the model),
- ``D`` the batch is done.

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


def _limit_memory(extra: int) -> None:
    """Let this process map at most ``extra`` more bytes than it holds now (the model
    loaded): a job's huge allocation then fails as a MemoryError / RuntimeError of
    that job instead of taking the machine's memory."""
    import resource

    with open("/proc/self/status", encoding="ascii") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


BATCH = b"BATCH\0"  # a batch message: BATCH, u32 header length, JSON header, the jobs


def pack_batch(jobs: list[tuple[str, bytes, bool]], max_jobs: int, max_tokens: int) -> bytes:
    """The engine's message for a batch of jobs ((id, job message, alone) each)."""
    head = json.dumps({"jobs": [{"id": i, "size": len(d), "alone": a} for i, d, a in jobs],
                       "max_jobs": max_jobs, "max_tokens": max_tokens}).encode()
    return b"".join([BATCH, len(head).to_bytes(4, "little"), head, *(d for _, d, _ in jobs)])


def unpack_batch(data: bytes) -> tuple[list[tuple[str, bytes, bool]], int, int]:
    n = int.from_bytes(data[len(BATCH):len(BATCH) + 4], "little")
    at = len(BATCH) + 4
    head = json.loads(data[at:at + n])
    at += n
    jobs = []
    for j in head["jobs"]:
        jobs.append((str(j["id"]), data[at:at + j["size"]], bool(j["alone"])))
        at += j["size"]
    return jobs, int(head["max_jobs"]), int(head["max_tokens"])


def main(conn, spec: str, max_result: int, max_print: int, max_memory: int | None = None,
         ) -> None:
    """The worker's loop (the spawn target).  A batch message (``pack_batch``) is
    answered per job: a tag byte, the job's id (32 characters), the body; then ``D``
    when the batch is done.  A plain job message (one job) is answered as a tag byte
    and the body."""
    from .batch import run_batch
    from .execute import ModelGuard

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
        if data.startswith(BATCH):
            jobs, max_jobs, max_tokens = unpack_batch(data)

            def reply(tag: bytes, job_id: str, body: bytes) -> None:
                send(tag + job_id.encode("ascii") + body)
        else:  # one job, answered without its id
            jobs, max_jobs, max_tokens = [("", data, True)], 1, 0

            def reply(tag: bytes, job_id: str, body: bytes) -> None:
                send(tag + body)
        try:
            changed = run_batch(model, guard, jobs, reply, max_result, max_print,
                                max_jobs, max_tokens)
        finally:
            torch.set_grad_enabled(grad)
        if changed:
            sys.exit(3)  # the engine starts a fresh worker, with the model loaded again
        if data.startswith(BATCH):
            send(b"D")
