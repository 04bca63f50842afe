"""The one pipeline and the one thread that runs it: requests queue, the worker takes the oldest and every queued
request with the same settings (up to ``max_batch`` images) — any mixes when their adapters allow it
(``batch.py``) — makes their LoRAs current and generates.

Isolation: every batch sets exactly its adapters, never fuses, and draws each request's initial noise from its
own ``np.random.Generator(np.random.PCG64(seed))`` (``DiffusionPipeline.__call__``, as a single call would), so a
request's image is the one the library gives for that seed and mix, whatever ran before or beside it.

No runaway work, no lost answers: a queued request whose client left is dropped; a running batch whose clients
all left stops after its current step; more than ``max_queue`` waiting requests answer 503 (``QueueFull``).
Stopping: :meth:`Worker.drain` refuses new requests and lets the queue run for a bounded time, then
:meth:`Worker.halt` answers every queued and running request ``ServerStopping`` (503, send it again) — the running
batch ends after its current step.

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
from dataclasses import replace
from typing import Any, Sequence

from .batch import BatchRun, Generation, Job, Progress, Result, batch_key
from .cache import AdapterCache, CachedAdapter
from .errors import BatchStopped, ClientGone, QueueFull, ServerStopping
from .metrics import Metrics

logger = logging.getLogger(__name__)
AGAIN = "send the request again"


def _pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """What a request that names no size or guidance gets: the pipeline's own defaults. The size: ``__call__``'s
    own integer height / width (Wan: 480 × 832), else diffusers' default side (``default_sample_size`` on Flux / SD3 /
    SDXL, the UNet's ``sample_size`` on SD1.x) times the VAE's scale; guidance: ``__call__``'s default (None where
    the pipeline has none, e.g. Qwen-Image's true CFG)."""
    params = inspect.signature(pipe.pipe.__call__).parameters
    given = {k: params[k].default for k in ("height", "width") if k in params and isinstance(params[k].default, int)}
    if len(given) < 2:
        sample = getattr(pipe.pipe, "default_sample_size", None) or getattr(pipe.denoiser.config, "sample_size", None)
        side = int(sample or 64) * int(getattr(pipe.pipe, "vae_scale_factor", 8))
        given = {"height": side, "width": side}
    guidance = params.get("guidance_scale")
    default = guidance.default if guidance is not None and guidance.default is not inspect.Parameter.empty else 7.5
    frames = params.get("num_frames")  # a video pipeline (Wan): its default length, and the VAE's frames per latent
    frames = frames.default if frames is not None and isinstance(frames.default, int) else None
    return {**given, "guidance_scale": None if default is None else float(default), "num_frames": frames,
            "frames_per_latent": int(getattr(pipe.pipe, "vae_scale_factor_temporal", 1) or 1)}


class Worker:
    """The pipeline, its lock, the queue and the worker thread.

    ``lock`` is held while a batch switches and generates; anything else that changes the pipeline (deleting a
    LoRA) takes it too. ``compiled``: the handle ``DiffusionPipeline.compile_denoiser()`` returned, when the
    denoiser runs compiled (its buffers are then written during the switch, each image's weights before each step).
    ``mixed``: batch different mixes together (default True).

    >>> Worker(pipe, cache, Metrics(), max_batch=4).defaults                    # doctest: +SKIP
    {'width': 512, 'height': 512, 'guidance_scale': 7.5, 'num_frames': None, 'frames_per_latent': 1}
    """

    def __init__(self, pipe: Any, cache: AdapterCache, metrics: Metrics, *, max_batch: int, max_queue: int = 64,
                 compiled: Any = None, mixed: bool = True) -> None:
        self.pipe = pipe
        self.cache = cache
        self.metrics = metrics
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.mixed = bool(mixed)  # (a compiled denoiser takes per-sample weights as data: no recompile)
        self.lock = threading.Lock()
        self.progress = Progress()
        self._run_batch = BatchRun(pipe, cache, compiled, self.progress)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._draining = False  # new requests refused; the queue still runs
        self._halted = False  # queued and running requests answered 503; the worker ends
        self._interrupt = False  # A1111's interrupt: the running batch decodes what it has
        self.running: tuple[Job, ...] = ()  # the batch taken from the queue and not yet answered
        self.defaults = _pipeline_defaults(pipe)
        self.takes_negative_prompt = "negative_prompt" in inspect.signature(pipe.pipe.__call__).parameters
        metrics.gauge("lorablend_queue_depth", lambda: len(self._queue))

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Start the worker thread (idempotent). >>> worker.start()  # doctest: +SKIP"""
        with self._cond:
            if self._thread is not None or self._draining:
                return
            self._thread = threading.Thread(target=self._run, name="lorablend-generate", daemon=True)
            self._thread.start()

    def drain(self, seconds: float) -> None:
        """Refuse new requests (503) and let the queued and running ones finish for at most ``seconds``; then
        :meth:`halt`. >>> worker.drain(10.0)  # doctest: +SKIP"""
        with self._cond:
            if self._draining:
                return
            self._draining = True
        timer = threading.Timer(max(0.0, float(seconds)), self.halt)
        timer.daemon = True
        timer.start()

    def halt(self) -> None:
        """Answer every queued request 503 now and end the running batch after its current step (its requests
        503 too); the worker thread ends. >>> worker.halt()  # doctest: +SKIP"""
        with self._cond:
            self._draining = self._halted = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            _fail(job, ServerStopping(f"the server is stopping and this request had not run; {AGAIN}"))

    def stop(self) -> None:
        """Halt and wait for the worker thread (the app's shutdown). >>> worker.stop()  # doctest: +SKIP"""
        self.halt()
        with self._cond:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def interrupt(self) -> bool:
        """A1111's interrupt: the running batch skips its remaining steps and answers what it has; False when
        nothing runs. >>> worker.interrupt()  # doctest: +SKIP"""
        with self._cond:
            self._interrupt = bool(self.running)
            return self._interrupt

    # ------------------------------------------------------------------ requests
    def resolve(self, gen: Generation) -> Generation:
        """``gen`` with the pipeline's defaults filled in. >>> worker.resolve(gen).width  # doctest: +SKIP"""
        return replace(gen, width=gen.width or self.defaults["width"], height=gen.height or self.defaults["height"],
                       guidance_scale=self.defaults["guidance_scale"] if gen.guidance_scale is None
                       else gen.guidance_scale, num_frames=gen.num_frames or self.defaults["num_frames"])

    def submit(self, gen: Generation, entries: Sequence[CachedAdapter]) -> Job:
        """Queue a request (``entries``: the parsed adapters of ``gen.loras``); returns its :class:`Job`. Raises
        ``ServerStopping`` while stopping and ``QueueFull`` past ``max_queue`` waiting requests.

        >>> worker.submit(Generation("a cat", seed=1, steps=20), []).future.result().images[0].shape  # doctest: +SKIP
        (512, 512, 3)
        """
        gen = self.resolve(gen)
        job = Job(gen, list(entries), batch_key(gen, entries, mixed=self.mixed), concurrent.futures.Future(),
                  time.perf_counter())
        with self._cond:
            if self._draining or self._thread is None:
                raise ServerStopping(f"the server is stopping (or not started); {AGAIN} in a few seconds")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue}); "
                                f"{AGAIN} in a few seconds")
            self._queue.append(job)
            self._cond.notify()
        return job

    def abandon(self, job: Job) -> None:
        """The client of ``job`` went away: drop it if queued; a running batch stops after its current step once
        all its clients are gone. >>> worker.abandon(job)  # doctest: +SKIP"""
        with self._cond:
            job.gone = True
            if job in self._queue:
                self._queue.remove(job)
                job.future.cancel()
                self.metrics.count("lorablend_requests_dropped_total")

    def waiting(self) -> int:
        """Requests queued or running. >>> worker.waiting()  # doctest: +SKIP"""
        with self._cond:
            return len(self._queue) + len(self.running)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                with self.lock:
                    images, switch_s, generate_s = self._run_batch.run(batch, self._should_stop, self.interrupted)
                self._answer(batch, images, switch_s, generate_s)
            except BatchStopped as stop:
                self._stopped(batch, stop)
            except BaseException as exc:  # never leave a handler waiting, never let the worker die
                logger.error("a batch of %d request(s) failed: %s: %s", len(batch), type(exc).__name__, exc)
                for job in batch:
                    _fail(job, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            finally:
                with self._cond:
                    self.running, self._interrupt = (), False

    def _should_stop(self) -> bool:
        return self._halted or all(job.gone for job in self.running)

    def image_pipeline(self) -> Any:
        """diffusers' image-to-image pipeline over the served components (built once; ``ValueError`` where the
        family has none). >>> worker.image_pipeline()  # doctest: +SKIP"""
        return self._run_batch.image_pipeline()

    def interrupted(self) -> bool:
        """Whether the running batch was interrupted. >>> worker.interrupted()  # doctest: +SKIP"""
        return self._interrupt

    def _stopped(self, batch: list[Job], stop: BatchStopped) -> None:
        if self._halted:
            error: Exception = ServerStopping(f"the server stopped while this request ran ({stop}); {AGAIN}")
        else:
            error = ClientGone(f"every client of this batch left; {stop}")
            self.metrics.count("lorablend_batches_cancelled_total")
        logger.info("a batch of %d request(s) %s: %s", len(batch), "halted" if self._halted else "cancelled", stop)
        for job in batch:
            _fail(job, error)

    def _next_batch(self) -> list[Job] | None:
        """The oldest request and every later one with its key, up to ``max_batch`` images in all."""
        with self._cond:
            while not self._halted and not self._queue:
                if self._draining:
                    return None  # drained: nothing left to run
                self._cond.wait(timeout=0.5)
            if self._halted:
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

    def _answer(self, batch: list[Job], images: list, switch_s: float, generate_s: float) -> None:
        """Each request its images (a :class:`Result`), the batch's timings in the metrics."""
        self.metrics.observe("lorablend_switch_seconds", switch_s)
        self.metrics.observe("lorablend_generate_seconds", generate_s)
        self.metrics.observe("lorablend_batch_images", len(images))
        self.metrics.observe("lorablend_batch_mixes", len({job.mix for job in batch}))
        started = time.perf_counter() - switch_s - generate_s
        at = 0
        for job in batch:
            n = job.generation.num_images
            timings = {"queue": round(started - job.submitted, 6), "switch": round(switch_s, 6),
                       "generate": round(generate_s, 6)}
            if not job.future.done():
                job.future.set_result(Result(list(images[at:at + n]), timings, len(images)))
            at += n


def _fail(job: Job, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)


__all__ = ["Worker"]
