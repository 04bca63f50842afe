"""The one pipeline and the one thread that runs it: requests queue, a worker takes the oldest and every queued
request with the same mix and settings (up to ``max_batch`` images), makes that mix current and generates.

Isolation: every batch sets exactly its mix (``set_adapters`` with its names and weights; an empty mix is an empty
set, so no LoRA), never fuses, and draws each request's initial noise from its own
``np.random.Generator(np.random.PCG64(seed))`` (``DiffusionPipeline.__call__``, as a single call would), so
a request's image is the one the library gives for that seed and mix, whatever ran before or beside it.
Switching between mixes goes through the unfused runtime: weights set, terms rebuilt, nothing reloaded.

A request whose client went away while it was queued is dropped before it costs any pipeline time.

>>> worker = Worker(pipe, cache, Metrics(), max_batch=4); worker.start()        # doctest: +SKIP
>>> result = worker.submit(Generation("a cat", seed=1, steps=20), []).future.result()   # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .cache import AdapterCache, CachedAdapter
from .metrics import Metrics
from .errors import ServerStopping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One validated request, in the library's terms (what every endpoint's body becomes).

    ``loras`` maps names to weights; ``scale`` is the call-time ``cross_attention_kwargs`` scale; ``None`` for
    ``width`` / ``height`` / ``guidance_scale`` means the pipeline's default (filled in by :meth:`Worker.submit`).

    >>> Generation("a cat", seed=3, steps=2, loras={"ink": 0.5}).num_images
    1
    """

    prompt: str
    seed: int
    steps: int
    loras: dict[str, float] = field(default_factory=dict)
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    scale: float = 1.0


@dataclass
class Result:
    """A request's images (H×W×3 floats in [0, 1], as ``output_type="np"``), the batch size it ran in, and
    its timings in seconds: ``queue`` (waiting), ``switch`` (making its mix current), ``generate``.

    >>> worker.submit(gen, entries).future.result().timings                 # doctest: +SKIP
    {'queue': 0.0002, 'switch': 0.003, 'generate': 0.21}
    """

    images: list[np.ndarray]
    timings: dict[str, float]
    batch_images: int


@dataclass(eq=False)
class Job:
    """A queued request: its generation, the parsed adapters of its mix (in name order), its batch key and the
    future its handler waits on. ``gone`` is set by the handler when the client disconnects.

    >>> job = worker.submit(gen, entries); job.key == worker.submit(gen, entries).key   # doctest: +SKIP
    True
    """

    generation: Generation
    entries: list[CachedAdapter]
    key: tuple
    future: concurrent.futures.Future
    submitted: float
    gone: bool = False


def _batch_key(gen: Generation, entries: Sequence[CachedAdapter]) -> tuple:
    """Requests with equal keys run as one batch: same adapter versions and weights, same call settings.
    (A missing negative prompt is its own key: SDXL encodes None as zeros, "" as the empty text.)"""
    mix = tuple((e.name, e.version, float(gen.loras[e.name])) for e in entries)
    return (mix, gen.scale, gen.steps, gen.guidance_scale, gen.width, gen.height, gen.negative_prompt is None)


class Worker:
    """The pipeline, its lock, the queue and the worker thread.

    ``lock`` is held while a batch switches and generates; anything else that changes the pipeline (deleting a
    LoRA) takes it too. ``compiled``: the handle ``DiffusionPipeline.compile_denoiser()`` returned, when the
    denoiser runs compiled (its buffers are then written during the switch, not in the first forward).

    >>> Worker(pipe, cache, Metrics(), max_batch=4).defaults                    # doctest: +SKIP
    {'width': 512, 'height': 512, 'guidance_scale': 7.5}
    """

    def __init__(self, pipe: Any, cache: AdapterCache, metrics: Metrics, *, max_batch: int,
                 compiled: Any = None) -> None:
        self.pipe = pipe
        self.compiled = compiled  # compile_denoiser()'s handle: its buffers are written at the switch
        self.cache = cache
        self.metrics = metrics
        self.max_batch = int(max_batch)
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False  # stopped for good: a late request gets 503, never a new worker
        self.running: tuple[Job, ...] = ()  # the batch taken from the queue and not yet answered
        # diffusers' own default side: Flux / SD3 / SDXL pipelines name it default_sample_size, SD1.x reads the UNet
        sample = getattr(pipe.pipe, "default_sample_size", None) or pipe.denoiser.config.sample_size
        size = int(sample) * int(pipe.vae_scale_factor)
        guidance = inspect.signature(pipe.pipe.__call__).parameters.get("guidance_scale")
        self.defaults = {"width": size, "height": size,
                         "guidance_scale": float(guidance.default) if guidance is not None else 7.5}
        metrics.gauge("lorablend_queue_depth", lambda: len(self._queue))

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Start the worker thread (idempotent). >>> worker.start()  # doctest: +SKIP"""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="lorablend-generate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, fail the queued ones, stop the worker. >>> worker.stop()  # doctest: +SKIP"""
        with self._cond:
            self._stopping = self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        for job in pending:
            job.future.set_exception(ServerStopping("the server shut down before this request ran; send it again"))
        if thread is not None:
            thread.join()

    # ------------------------------------------------------------------ requests
    def resolve(self, gen: Generation) -> Generation:
        """``gen`` with the pipeline's defaults filled in. >>> worker.resolve(gen).width  # doctest: +SKIP"""
        return replace(gen, width=gen.width or self.defaults["width"], height=gen.height or self.defaults["height"],
                       guidance_scale=self.defaults["guidance_scale"] if gen.guidance_scale is None
                       else gen.guidance_scale)

    def submit(self, gen: Generation, entries: Sequence[CachedAdapter]) -> Job:
        """Queue a request (``entries``: the parsed adapters of ``gen.loras``); returns its :class:`Job`.

        >>> worker.submit(Generation("a cat", seed=1, steps=20), []).future.result().images[0].shape  # doctest: +SKIP
        (512, 512, 3)
        """
        gen = self.resolve(gen)
        ordered = sorted(entries, key=lambda e: e.name)
        job = Job(gen, ordered, _batch_key(gen, ordered), concurrent.futures.Future(), time.perf_counter())
        with self._cond:
            if self._stopping or self._thread is None:
                raise ServerStopping("the server is not running; start it (or wait for it to start)")
            self._queue.append(job)
            self._cond.notify()
        return job

    def abandon(self, job: Job) -> None:
        """The client of ``job`` went away: drop it if it has not started (frees its place at once).

        >>> worker.abandon(job)                                                 # doctest: +SKIP
        """
        with self._cond:
            job.gone = True
            if job in self._queue:
                self._queue.remove(job)
                job.future.cancel()
                self.metrics.count("lorablend_requests_dropped_total")

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            except BaseException as exc:  # never leave a handler waiting, never let the worker die
                logger.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            finally:
                self.running = ()

    def _next_batch(self) -> list[Job] | None:
        """The oldest live request and every later one with its key, up to ``max_batch`` images in all."""
        with self._cond:
            while not self._stopping and not self._queue:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch, images = [first], first.generation.num_images
            for job in list(self._queue):
                if job.key == first.key and images + job.generation.num_images <= self.max_batch:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.generation.num_images
            for job in batch:
                job.future.set_running_or_notify_cancel()
            self.running = tuple(batch)
            return batch

    def _serve(self, batch: list[Job]) -> None:
        with self.lock:
            locked = time.perf_counter()
            self._switch(batch[0])
            switched = time.perf_counter()
            images = self._generate(batch)
            done = time.perf_counter()
        switch_s, generate_s = switched - locked, done - switched
        self.metrics.observe("lorablend_switch_seconds", switch_s)
        self.metrics.observe("lorablend_generate_seconds", generate_s)
        self.metrics.observe("lorablend_batch_images", len(images))
        at = 0
        for job in batch:
            n = job.generation.num_images
            timings = {"queue": round(locked - job.submitted, 6),
                       "switch": round(switch_s, 6), "generate": round(generate_s, 6)}
            job.future.set_result(Result([images[i] for i in range(at, at + n)], timings, len(images)))
            at += n

    def _switch(self, job: Job) -> None:
        """Make exactly this job's mix current: load what the pipeline lacks, set the weights, build the terms."""
        self.cache.activate(job.entries)
        names = [e.name for e in job.entries]
        self.pipe.set_adapters(names, [float(job.generation.loras[n]) for n in names])
        self.pipe.prepare()  # build the blended terms here, so 'switch' times them and 'generate' does not
        if self.compiled is not None:
            self.compiled.sync()  # the compiled denoiser's fixed buffers, written in place: no recompile

    def _generate(self, batch: list[Job]) -> list[np.ndarray]:
        """One pipeline call for the batch; each request's noise from its own seed, as its own call would draw it."""
        g = batch[0].generation
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[np.random.Generator] = []
        for job in batch:
            gen, n = job.generation, job.generation.num_images
            prompts += [gen.prompt] * n
            negatives += [gen.negative_prompt or ""] * n
            # one generator per request, drawn once per image in order: the same numbers as that request's own
            # call (one (n, …) draw); the pipeline draws them where it sizes its latents (packed for Flux)
            generators += [np.random.Generator(np.random.PCG64(gen.seed))] * n
        kwargs = dict(prompt=prompts, negative_prompt=None if g.negative_prompt is None else negatives,
                      generator=generators, num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                      height=g.height, width=g.width, output_type="np")
        if g.scale != 1.0:
            kwargs["cross_attention_kwargs"] = {"scale": g.scale}
        out = self.pipe(**kwargs).images  # (diffusers' __call__ runs under no_grad)
        return [np.asarray(img, dtype=np.float32) for img in out]


__all__ = ["Worker", "Generation", "Job", "Result"]
