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

from .files import DEFAULT_WEIGHT_NAMES, pick_weight_file  # the one weight-file picker

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
        return str(pick_weight_file(path / subfolder, weight_name=weight_name or None, safetensors_only=bool(use_safetensors)))
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
        return str(pick_weight_file(folder, f"repo {repo_id}", safetensors_only=bool(hub_kwargs.get("use_safetensors"))))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing file or folder nor a valid repo id") from exc
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        raise FileNotFoundError(
            f"cannot get {weight_name or 'a LoRA file'} from repo {repo_id!r}: {exc}. Offline, the file must be "
            "in the local hub cache (HF_HUB_CACHE); online, check the repo id and weight_name"
        ) from exc


def hf_progress_bars(enabled: bool = False) -> None:
    """diffusers and transformers draw a loading bar per pipeline load on stderr; our commands show their own
    progress (steps, cells, layers) instead, so they switch those off. ``enabled=True`` leaves the libraries'
    settings alone (a library caller's choice).

    >>> hf_progress_bars(True)
    """
    if enabled:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()