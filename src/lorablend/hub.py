"""Where a LoRA comes from: a local file, a folder, or a Hugging Face repo id (through huggingface_hub).

``fetch_lora`` returns a local file path (or passes a state dict / Adapter through). It follows diffusers'
rules with one difference: a folder or repo with several candidate files and no ``weight_name`` is an error
that lists them, never a silent pick of the first. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``)
repo ids resolve from the local hub cache exactly as they do online.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
HUB_KWARGS = (
    "subfolder",
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "revision",
    "use_safetensors",
)
# Files in a LoRA repo that are never the LoRA (diffusers skips the same names when it guesses).
_NOT_LORA = ("scheduler", "optimizer", "checkpoint")


def _candidates(names: list[str], use_safetensors: bool | None) -> list[str]:
    exts = (".safetensors",) if use_safetensors else (".safetensors", ".bin", ".pt", ".ckpt")
    found = [n for n in names if n.endswith(exts) and not any(bad in Path(n).name for bad in _NOT_LORA)]
    safetensors = [n for n in found if n.endswith(".safetensors")]
    return safetensors or found  # safetensors first, as diffusers does


def _pick(names: list[str], where: str, use_safetensors: bool | None) -> str:
    for default in DEFAULT_WEIGHT_NAMES:
        if default in names and (default.endswith(".safetensors") or not use_safetensors):
            return default
    found = _candidates(names, use_safetensors)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{where} holds no LoRA weight file (.safetensors/.bin); files: {sorted(names)[:10]}")
    raise ValueError(f"{where} holds several weight files {sorted(found)}; pass weight_name= to choose one")


def fetch_lora(source: Any, weight_name: str | None = None, **hub_kwargs: Any) -> Any:
    """Resolve ``source`` to a local LoRA file path; dicts and Adapters pass through unchanged.

    ``source`` is a file path, a folder (``weight_name`` or the single weight file in it), or a repo id
    (``weight_name`` or ``pytorch_lora_weights.safetensors`` or the single weight file in the repo).
    ``hub_kwargs`` are huggingface_hub's: ``subfolder, cache_dir, force_download, proxies,
    local_files_only, token, revision`` (and diffusers' ``use_safetensors``).

    >>> fetch_lora("ostris/ikea-instructions-lora-sdxl", weight_name="ikea_instructions_xl_v1_5.safetensors")  # doctest: +SKIP
    '/root/.cache/huggingface/hub/models--ostris--ikea-instructions-lora-sdxl/snapshots/…/ikea_instructions_xl_v1_5.safetensors'
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; hub options are {list(HUB_KWARGS)}")
    if isinstance(source, Mapping) or not isinstance(source, (str, os.PathLike)):
        return source
    subfolder = hub_kwargs.get("subfolder") or ""
    use_safetensors = hub_kwargs.get("use_safetensors")
    path = Path(source).expanduser()
    if path.is_file():
        if weight_name:
            raise ValueError(f"{source} is a file; weight_name={weight_name!r} only applies to a folder or repo id")
        return str(path)
    if path.is_dir():
        folder = path / subfolder
        if weight_name:
            file = folder / weight_name
            if not file.is_file():
                raise FileNotFoundError(f"no file {weight_name!r} in {folder}; it has {sorted(p.name for p in folder.iterdir())[:10]}")
            return str(file)
        names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        return str(folder / _pick(names, str(folder), use_safetensors))
    if path.suffix in (".safetensors", ".bin", ".pt", ".ckpt") or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"LoRA file {source} does not exist")
    return _fetch_from_hub(str(source), weight_name, hub_kwargs)


def _fetch_from_hub(repo_id: str, weight_name: str | None, hub_kwargs: dict) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if k != "use_safetensors" and v is not None}
    subfolder = kwargs.pop("subfolder", None) or None
    try:
        if weight_name:
            return hf_hub_download(repo_id, weight_name, subfolder=subfolder, **kwargs)
        for default in DEFAULT_WEIGHT_NAMES[:1]:
            try:
                return hf_hub_download(repo_id, default, subfolder=subfolder, **kwargs)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                pass
        pattern = f"{subfolder}/*" if subfolder else "*"
        snap = Path(snapshot_download(repo_id, allow_patterns=[pattern], **{k: v for k, v in kwargs.items()
                                                                          if k != "proxies"}))
        folder = snap / subfolder if subfolder else snap
        names = [p.name for p in folder.iterdir() if p.is_file()]
        return str(folder / _pick(names, f"repo {repo_id}", hub_kwargs.get("use_safetensors")))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing file or folder nor a valid repo id") from exc
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        raise FileNotFoundError(
            f"cannot get {weight_name or 'a LoRA file'} from repo {repo_id!r}: {exc}. Offline, the file must be "
            "in the local hub cache (HF_HUB_CACHE); online, check the repo id and weight_name"
        ) from exc
