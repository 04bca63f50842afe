"""One server's state and the way of a generation request through it: names -> parsed adapters -> the queue ->
the answer, or nothing when the client left. Shared by the native routes (``app``) and the A1111 / OpenAI routes
(``compat``).

>>> state = ServerState(pipeline, ServeSettings(lora_dir="loras/"))            # doctest: +SKIP
>>> gen, result = await generate(state, Generation("a cat", seed=1, steps=20), request)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from .cache import AdapterCache, CachedAdapter
from .catalog import Catalog, LoraSource
from .config import ServeSettings
from .batch import Generation, Result
from .worker import Worker
from .metrics import Metrics
from .errors import ClientGone
from .schemas import invalid
from ..runtime.schedule import ExpertSplit
from .img2img import decode_init_images


class ServerState:
    """Everything one server owns (no module-level state): settings, catalog, cache, worker, metrics, and the
    folder where uploads live (``--upload-dir``, or a private one removed when the server stops).

    >>> app.state.lorablend.cache.names_loaded()                            # doctest: +SKIP
    ['ink']
    """

    def __init__(self, pipe: Any, config: ServeSettings, compiled: Any = None) -> None:
        self.pipe = pipe
        self.config = config.check()
        self.metrics = Metrics()
        # uploads live in --upload-dir (kept: they are served again after a restart) or a private temporary folder
        self.keep_uploads = config.upload_dir is not None
        self.upload_dir = Path(config.upload_dir) if self.keep_uploads else Path(tempfile.mkdtemp(
            prefix="lorablend-uploads-"))
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(config.lora_dir, uploads=self.upload_dir)
        self.cache = AdapterCache(pipe, budget_bytes=config.cache_bytes, metrics=self.metrics)
        self.worker = Worker(pipe, self.cache, self.metrics, max_batch=config.max_batch, max_queue=config.max_queue,
                             compiled=compiled, mixed=config.mixed_batches)
        self.options: dict[str, Any] = {}  # A1111 options a client set (POST /sdapi/v1/options)
        inner = getattr(pipe, "pipe", pipe)
        self.model_name = str(getattr(inner, "name_or_path", "") or type(inner).__name__)

    def adapters_for(self, names: list[str]) -> list[CachedAdapter]:
        """The parsed adapters of a mix: 404 for an unknown name, 422 for a file the reader refuses.

        >>> [e.name for e in state.adapters_for(["ink", "paper"])]              # doctest: +SKIP
        ['ink', 'paper']
        """
        sources = [self.catalog.lookup(n) for n in names]  # every name checked before any file is read
        return [self.cache.get(s) for s in sources]

    def describe(self, source: LoraSource) -> dict[str, Any]:
        """One row of ``GET /v1/loras``.

        >>> state.describe(state.catalog.lookup("ink"))["format"]              # doctest: +SKIP
        'kohya'
        """
        entry = self.cache.cached(source.name)
        row: dict[str, Any] = {"name": source.name, "origin": source.origin,
                               "loaded": source.name in self.cache.names_loaded(), "cached": entry is not None}
        try:
            row["bytes"] = source.path.stat().st_size
            if entry is not None:
                ranks = [d.rank for d in entry.adapter.deltas.values() if d.rank is not None]
                row.update(format=entry.adapter.format, family=entry.adapter.family, rank=max(ranks, default=None))
            else:
                row.update(self.catalog.info(source))
        except (OSError, ValueError) as exc:  # a damaged file is listed with its problem, not hidden
            row.update(format=None, family=None, rank=None, error=str(exc))
        return row

    def close(self) -> None:
        """Stop the worker; remove the uploads unless they live in --upload-dir (the app's shutdown).
        >>> state.close()  # doctest: +SKIP"""
        self.worker.stop()
        if not self.keep_uploads:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    def check_blocks(self, gen: Generation) -> Generation:
        """``gen`` with its ``lbw=`` block weights checked against this model's LoRA Block Weight labels and spelled
        out (labels: the blocks named, every other 0); 422 naming the labels or counts that fit.

        >>> state.check_blocks(Generation("x", 1, 2, loras={"ink": 1.0}, blocks={"ink": [1.0, 0.0]}))  # doctest: +SKIP
        Traceback (most recent call last):
        fastapi.exceptions.RequestValidationError: ...
        """
        if not gen.blocks:
            return gen
        from ..naming.blocks import LBW_ORDERS, expand_block_weights

        view = self.pipe.model_view
        family, known = view.family or "", view.index.block_labels()
        orders = LBW_ORDERS.get(family, {})
        spelled = {}
        for name, spec in gen.blocks.items():
            try:
                if isinstance(spec, dict):  # the blocks named, every other block of this model 0
                    spelled[name] = expand_block_weights(spec, family, known, default=0.0)
                    continue
                if len(spec) not in orders:
                    raise ValueError(f"a block-weight list for {family or 'this'} model must have one of "
                                     f"{sorted(orders)} values (LoRA Block Weight order), got {len(spec)}")
                # LBW's order; the labels this model has (a smaller model lacks some), the others as they are
                spelled[name] = {k: v for k, v in zip(orders[len(spec)], spec) if k in known}
            except ValueError as exc:
                raise invalid("prompt", f"<lora:{name}:…:lbw=…>: {exc}", name) from None
        return replace(gen, blocks=spelled)

    def check_experts(self, gen: Generation, entries: Sequence[CachedAdapter] = ()) -> Generation:
        """``gen`` with each Wan 2.2 expert split (``{"high", "low"}`` / ``<lora:x:H;L>``) turned into the
        keyframes of this pipeline's boundary for its steps; 422 naming the field where the pipeline has one
        denoiser, or where a weight other than 0 goes to an expert the LoRA (among ``entries``) has no layer on
        (a file loaded onto the high-noise ``transformer`` only: its ``low`` weight would change nothing).

        >>> gen = Generation("x", 1, 4, {"x": 1.0}, schedules={"x": ExpertSplit(1.0, 0.3)})
        >>> state.check_experts(gen).schedules                                 # doctest: +SKIP
        {'x': ((0.0, 1.0), (0.5, 1.0), (0.75, 0.3))}
        """
        splits = {n: s for n, s in gen.schedules.items() if isinstance(s, ExpertSplit)}
        if not splits:
            return gen
        schedules, held = dict(gen.schedules), {e.name: e.adapter.components() for e in entries}
        for name, split in splits.items():
            try:
                schedules[name] = split.keyframes(self.pipe, gen.steps)
            except ValueError as exc:
                raise invalid(split.given, f"LoRA {name!r}: {exc}", name) from None
            idle = [(side, expert) for side, expert, w in (("high", "transformer", split.high),
                                                           ("low", "transformer_2", split.low))
                    if w != 0 and name in held and expert not in held[name]]
            if idle:
                side, expert = idle[0]
                raise invalid(split.given, f"LoRA {name!r} has no layer on the {side}-noise expert ({expert}): its "
                                           f"{side!r} weight would change nothing; give it 0, or serve a file with "
                                           f"{expert} layers", name)
        return replace(gen, schedules=schedules)

    def check_init_images(self, gen: Generation) -> Generation:
        """An img2img ``gen`` with its init images decoded and resized (``img2img.py``); 422 naming ``init_images``
        for an image that is none, or a pipeline without an image-to-image pipeline in diffusers.

        >>> state.check_init_images(state.check_size(gen)).init_images[0].size      # doctest: +SKIP
        (512, 512)
        """
        if gen.strength is None:
            return gen
        try:
            self.worker.image_pipeline()
            images = decode_init_images(gen.init_images, gen.width, gen.height)
        except ValueError as exc:
            raise invalid("init_images", str(exc)) from None
        return replace(gen, init_images=images)

    def check_size(self, gen: Generation) -> Generation:
        """``gen`` with the pipeline's defaults filled in; 422 past ``--max-pixels``.

        >>> state.check_size(Generation("x", 1, 2, width=4096, height=4096))       # doctest: +SKIP
        Traceback (most recent call last):
        fastapi.exceptions.RequestValidationError: ...
        """
        gen = self.worker.resolve(gen)
        if gen.negative_prompt is not None and not self.worker.takes_negative_prompt:
            raise invalid("negative_prompt", f"this server's pipeline ({type(self.pipe.pipe).__name__}) takes no "
                                             "negative prompt; leave it out", gen.negative_prompt[:40])
        self._check_frames(gen)
        if gen.width * gen.height > self.config.max_pixels:
            raise invalid("width", f"{gen.width}x{gen.height} is {gen.width * gen.height:,} pixels: this server "
                                   f"allows at most {self.config.max_pixels:,} (--max-pixels); ask for a smaller "
                                   "size", f"{gen.width}x{gen.height}")
        return gen


    def _check_frames(self, gen: Generation) -> None:
        """422 naming ``num_frames``: given to an image pipeline, past ``--max-frames``, or a length the video VAE
        cannot pack (Wan: 4k + 1 frames, 4 to a latent after the first)."""
        if gen.num_frames is None:
            return
        defaults = self.worker.defaults
        if defaults["num_frames"] is None:
            raise invalid("num_frames", f"this server's pipeline ({type(self.pipe.pipe).__name__}) makes images, not "
                                        "videos; leave num_frames out", gen.num_frames)
        if gen.num_frames > self.config.max_frames:
            raise invalid("num_frames", f"{gen.num_frames} frames: this server allows at most "
                                        f"{self.config.max_frames} (--max-frames); ask for fewer", gen.num_frames)
        step = defaults["frames_per_latent"]
        if (gen.num_frames - 1) % step:
            raise invalid("num_frames", f"{gen.num_frames} frames: this video model packs {step} frames to a latent "
                                        f"after the first, so ask for 1 more than a multiple of {step} (e.g. "
                                        f"{(gen.num_frames - 1) // step * step + 1})", gen.num_frames)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def generate(state: ServerState, gen: Generation, request: Request) -> tuple[Generation, Result]:
    """Resolve the mix, queue the request, wait for its batch; a client that leaves frees its place.

    >>> gen, result = await generate(state, body.generation(config), request)   # doctest: +SKIP
    """
    gen = state.check_blocks(state.check_size(gen))
    gen = await run_in_threadpool(state.check_init_images, gen)  # (decoding images: off the event loop)
    entries = await run_in_threadpool(state.adapters_for, list(gen.loras))
    gen = state.check_experts(gen, entries)
    if gen.schedules and (not state.worker.mixed or not all(e.low_rank for e in entries)):
        raise invalid("loras", "a weight schedule needs per-sample weights: LoRA (low-rank) files, and a server "
                               "that batches mixes (mixed_batches on); send constant weights", sorted(gen.schedules))
    state.worker.start()  # idempotent: started here too, because a mounted sub-app gets no startup event
    job = state.worker.submit(gen, entries)
    result = asyncio.wrap_future(job.future)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        state.worker.abandon(job)
        raise ClientGone("the client disconnected before its images were made")
    return job.generation, result.result()


__all__ = ["ServerState", "generate"]
