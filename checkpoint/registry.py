"""Models by name: what is on this machine (the Hugging Face cache and folders ``dsmoe quantize`` wrote),
downloading a repo's checkpoint files, and removing either.

Downloads are huggingface_hub's ``snapshot_download`` limited to the files dsmoe reads. A pull that
fails keeps the files it finished, so running it again fetches only the rest (and huggingface_hub
itself resumes a dropped connection within a run). The folders written by ``dsmoe quantize`` are
remembered in ``$XDG_CACHE_HOME/dsmoe/models.json`` (default ``~/.cache``), so ``list`` finds them
wherever they were written and ``rm`` deletes only what dsmoe made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmoe.errors import CheckpointError, DsmoeError, UsageError
from dsmoe.checkpoint.reader import DOWNLOAD_PATTERNS

DEEPSEEK_ARCHITECTURES = ("DeepseekForCausalLM",)


@dataclass
class LocalModel:
    """One checkpoint on this machine."""

    name: str  # a repo id for the Hugging Face cache, the folder for a quantized one
    path: Path
    source: str  # "hf-cache" or "quantized"
    size_bytes: int
    format: str  # "bf16", "nf4", "int8", ...
    layers: int | None


def registry_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsmoe" / "models.json"


def _read_registry() -> list[str]:
    path = registry_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); delete it to start a new list") from None
    folders = data.get("quantized") if isinstance(data, dict) else None
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        raise UsageError(f"{path}: not a dsmoe model list; delete it to start a new one")
    return folders


def _write_registry(folders: list[str]) -> None:
    path = registry_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"quantized": folders}, f, indent=1)
    os.replace(tmp, path)


def remember_quantized(folder: str | os.PathLike[str]) -> None:
    """Record a folder written by ``dsmoe quantize`` so that ``list`` shows it."""
    resolved = str(Path(folder).resolve())
    folders = [f for f in _read_registry() if f != resolved]
    _write_registry(folders + [resolved])


def _config_summary(folder: Path) -> tuple[str, int | None] | None:
    """(format, layers) of a DeepSeekMoE checkpoint folder, or None when it is not one."""
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("model_type") != "deepseek" and not set(config.get("architectures") or []) & set(DEEPSEEK_ARCHITECTURES):
        return None
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        if quant.get("load_in_8bit"):
            fmt = "int8"
        else:
            fmt = str(quant.get("bnb_4bit_quant_type", "4-bit")) + ("-dq" if quant.get("bnb_4bit_use_double_quant") else "")
    else:
        fmt = str(config.get("torch_dtype") or "floats").replace("bfloat16", "bf16").replace("float16", "fp16") \
            .replace("float32", "fp32")
    layers = config.get("num_hidden_layers")
    return fmt, layers if isinstance(layers, int) else None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[LocalModel]:
    """DeepSeekMoE checkpoints in the Hugging Face cache, then the folders ``dsmoe quantize`` wrote."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    found: list[LocalModel] = []
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        cache = None
    for repo in sorted(cache.repos if cache else [], key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            summary = _config_summary(revision.snapshot_path)
            if summary is None:
                continue
            found.append(LocalModel(repo.repo_id, revision.snapshot_path, "hf-cache", revision.size_on_disk, *summary))
            break  # the newest revision stands for the repo
    for folder in _read_registry():
        path = Path(folder)
        summary = _config_summary(path)
        if summary is not None:
            found.append(LocalModel(str(path), path, "quantized", _folder_bytes(path), *summary))
    return found


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download ``repo_id``'s checkpoint files into the Hugging Face cache (resuming a partial one).

    Raises CheckpointError when the download fails or the repo is not a DeepSeekMoE checkpoint.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise UsageError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repo on the hub (or it needs a token: huggingface-cli login)") from None
    except Exception as exc:  # noqa: BLE001  (the hub client's HTTP errors differ between its versions)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{repo_id}: download failed ({type(exc).__name__}: {first_line}); "
                              f"run it again to resume (finished files are kept)") from None
    if _config_summary(path) is None:
        raise CheckpointError(f"{repo_id}: downloaded, but it is not a DeepSeekMoE checkpoint (config.json)")
    return path


def remove(name: str) -> LocalModel:
    """Delete a model ``list_models`` shows: a repo's cached revisions, or a folder dsmoe quantize wrote."""
    models = list_models()
    resolved = str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else None
    match = next((m for m in models if m.name == name or (resolved and str(m.path) == resolved)), None)
    if match is None:
        raise UsageError(f"{name}: not a model dsmoe knows ('dsmoe list' shows them)")
    if match.source == "hf-cache":
        # The repo's whole cache folder: every revision, its blobs and refs.
        target = match.path.parents[1]
        if not target.name.startswith("models--"):
            raise DsmoeError(f"{match.path}: not laid out as a Hugging Face cache entry; not removing it")
    else:
        target = match.path
    try:
        shutil.rmtree(target)
    except OSError as exc:
        raise DsmoeError(f"cannot remove {target}: {exc.strerror}") from None
    if match.source == "quantized":
        _write_registry([f for f in _read_registry() if f != str(match.path)])
    return match
