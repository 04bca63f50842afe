"""The AUTOMATIC1111 routes a front-end calls at start-up or while it waits, beyond txt2img: progress (step, ETA,
optionally a preview of the current image), interrupt / skip, options (GET, and POST kept as given: they change
nothing in generation except the checkpoint check), and the listings (cmd-flags, sd-vae, embeddings, schedulers,
upscalers, prompt-styles, scripts, memory, refresh-loras) answered with what this server has: one model, its own
scheduler, no VAE choice, no embeddings, no upscalers, no styles.

>>> add_a1111_routes(app, state)                                               # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import os
import time
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Body, FastAPI, Query
from fastapi.concurrency import run_in_threadpool

from .schemas import invalid
from .state import ServerState

# A1111's "Approx cheap" preview: SD latents (4 channels) -> RGB by one fixed 4x3 matrix, no VAE call.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])
MAX_OPTIONS = 200  # keys one POST /sdapi/v1/options may set (the body limit bounds the rest)


def preview_png(latents: Any) -> str | None:
    """The first image of a batch's latents as a cheap RGB preview (base64 PNG), or None for latents that are
    not 4-channel images (Flux packs its latents).

    >>> preview_png(torch.zeros(1, 4, 8, 8))[:8]
    'iVBORw0K'
    """
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != 4:
        return None
    from PIL import Image

    rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), LATENT_RGB)
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def progress(state: ServerState, with_image: bool) -> dict[str, Any]:
    """``GET /sdapi/v1/progress``: the running batch's steps done, its ETA in seconds, the requests waiting.

    >>> progress(state, with_image=False)["state"]["sampling_steps"]            # doctest: +SKIP
    20
    """
    worker = state.worker
    now = worker.progress
    running = bool(worker.running)
    done, steps = (now.done, now.steps) if running else (0, 0)
    return {"progress": round(done / steps, 4) if steps else 0.0, "eta_relative": now.eta() if running else 0.0,
            "state": {"skipped": False, "interrupted": worker.interrupted(), "job": _job(worker.running),
                      "job_count": worker.waiting(), "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                      "job_no": 0, "sampling_step": done, "sampling_steps": steps},
            "current_image": preview_png(now.latents) if with_image and running else None, "textinfo": None}


def _job(running: tuple) -> str:
    """A1111's name of the running job: "txt2img", "img2img", or "" when nothing runs."""
    if not running:
        return ""
    return "txt2img" if running[0].generation.strength is None else "img2img"


def memory() -> dict[str, Any]:
    """``GET /sdapi/v1/memory``: host RAM (bytes) and, with CUDA, the torch allocator's figures.

    >>> sorted(memory())
    ['cuda', 'ram']
    """
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * size
    ram = {"free": free, "used": pages * size - free, "total": pages * size}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free_c, total_c = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {"ram": ram, "cuda": {"system": {"free": free_c, "used": total_c - free_c, "total": total_c},
                                 "active": {"current": stats.get("active_bytes.all.current", 0),
                                            "peak": stats.get("active_bytes.all.peak", 0)},
                                 "allocated": {"current": torch.cuda.memory_allocated(),
                                               "peak": torch.cuda.max_memory_allocated()}}}


def add_a1111_routes(app: FastAPI, state: ServerState) -> None:
    """Add the routes of this module to ``app``. >>> add_a1111_routes(app, app.state.lorablend)  # doctest: +SKIP"""

    @app.get("/sdapi/v1/progress")
    async def a1111_progress(skip_current_image: bool = Query(False)) -> dict:
        """AUTOMATIC1111's progress: step, steps, ETA (seconds) and, unless skipped, a cheap preview PNG."""
        return await run_in_threadpool(progress, state, not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def a1111_interrupt() -> dict:
        """Stop the running batch after its current step; its requests answer the images decoded from there."""
        return {"interrupted": state.worker.interrupt()}

    @app.post("/sdapi/v1/skip")
    async def a1111_skip() -> dict:
        """A1111's skip: as interrupt here (one batch at a time)."""
        return {"interrupted": state.worker.interrupt()}

    @app.get("/sdapi/v1/options")
    async def a1111_options() -> dict:
        """AUTOMATIC1111's settings: the model in use, and whatever a client set (they change nothing else)."""
        return {**state.options, "sd_model_checkpoint": state.model_name, "sd_vae": "Automatic"}

    @app.post("/sdapi/v1/options")
    async def a1111_set_options(options: Annotated[dict[str, Any], Body()]) -> dict:
        """Keep the options given (front-ends set them at start); a checkpoint other than the served model: 422."""
        wanted = options.get("sd_model_checkpoint")
        if wanted not in (None, state.model_name):
            raise invalid("sd_model_checkpoint", f"this server runs one model, {state.model_name!r}; it cannot "
                                                 "switch checkpoints", wanted)
        if len(state.options) + len(options) > MAX_OPTIONS:
            raise invalid("options", f"at most {MAX_OPTIONS} options are kept", len(options))
        state.options.update({k: v for k, v in options.items() if k != "sd_model_checkpoint"})
        return {}

    _add_listings(app, state)


def _add_listings(app: FastAPI, state: ServerState) -> None:
    """The listings: what this server has of what A1111 front-ends ask about."""

    @app.get("/sdapi/v1/cmd-flags")
    async def a1111_cmd_flags() -> dict:
        """The server's settings a front-end may want (limits; no paths)."""
        c = state.config
        return {"api": True, "nowebui": True, "max_batch": c.max_batch, "max_steps": c.max_steps,
                "max_pixels": c.max_pixels, "max_images": c.max_images, "api_auth": c.token is not None}

    @app.get("/sdapi/v1/sd-vae")
    async def a1111_sd_vae() -> list:
        """No VAE to choose: the model's own."""
        return []

    @app.get("/sdapi/v1/embeddings")
    async def a1111_embeddings() -> dict:
        """No textual-inversion embeddings are served."""
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/schedulers")
    async def a1111_schedulers() -> list:
        """The pipeline's own scheduler, the only one used."""
        name = type(state.pipe.pipe.scheduler).__name__
        return [{"name": name, "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}]

    @app.post("/sdapi/v1/refresh-loras")
    async def a1111_refresh_loras() -> dict:
        """Read --lora-dir again (it is also read whenever a name is unknown)."""
        found = await run_in_threadpool(state.catalog.scan)
        return {"loras": len(found)}

    @app.get("/sdapi/v1/upscalers")
    async def a1111_upscalers() -> list:
        """No upscalers: A1111's "None" entry only."""
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]

    @app.get("/sdapi/v1/prompt-styles")
    async def a1111_prompt_styles() -> list:
        """No saved prompt styles."""
        return []

    @app.get("/sdapi/v1/scripts")
    async def a1111_scripts() -> dict:
        """No scripts or extensions (what webuiapi reads at start)."""
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/memory")
    async def a1111_memory() -> dict:
        """RAM and CUDA memory in bytes."""
        return memory()


__all__ = ["add_a1111_routes", "memory", "preview_png", "progress"]
