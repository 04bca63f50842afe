"""One batch on the pipeline: what a request becomes (:class:`Generation`, :class:`Job`), which requests may share a
batch (:func:`batch_key`), and running one batch (:class:`BatchRun`): make its LoRAs current, generate, report
progress and stop between steps when asked.

Any mix in one batch: requests with the same settings (size, steps, guidance, scale) but different LoRA mixes run
as ONE pipeline call. The batch's adapters are set with weight 1 and each image gets its own weights between the
down and up products of every layer (``LoraRuntime.call_sample_weights``, Punica / S-LoRA's idea), so each image
is the one its own call gives, within float tolerance. A mix with an adapter that is not one low-rank pair per
layer (LoHa, LoKr, a bias delta) batches only with its own mix. A compiled denoiser takes the per-sample weights as
data (``runtime.compiled``): mixes and schedules change with no recompile.

>>> batch_key(Generation("a cat", seed=1, steps=2, width=64, height=64, guidance_scale=7.0), [], mixed=True)
(None, 1.0, 2, 7.0, 64, 64, True, None, None)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..images.drawing import pictures
from .cache import AdapterCache, CachedAdapter
from ..runtime.schedule import StepSchedule
from .errors import BatchStopped
from .img2img import image_pipeline


@dataclass(frozen=True)
class Generation:
    """One validated request, in the library's terms (what every endpoint's body becomes).

    ``loras`` maps names to weights; ``scale`` is the call-time ``cross_attention_kwargs`` scale; ``None`` for
    ``width`` / ``height`` / ``guidance_scale`` means the pipeline's default (filled in by :meth:`Worker.resolve`).
    ``seed_per_image``: image ``i`` is drawn from ``seed + i`` alone (A1111: each image reproducible by its own
    seed); else all of a request's images come from one generator drawn in order (the library's
    ``num_images_per_prompt``). ``blocks``: LoRA Block Weight specs from ``<lora:name:w:lbw=…>`` tokens, already
    checked against the model and spelled out over its labels.

    >>> Generation("a cat", seed=3, steps=2, loras={"ink": 0.5}).seeds(2)
    [3, 3]
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
    seed_per_image: bool = False
    blocks: dict[str, Any] = field(default_factory=dict)  # name -> LoRA Block Weight spec (at weight 1)
    schedules: dict[str, Any] = field(default_factory=dict)  # name -> keyframes (runtime/schedule.py)
    init_images: tuple = ()  # img2img: the init images (base64 as sent; PIL images once checked), image i's: [i % n]
    strength: float | None = None  # img2img's denoising strength; None: txt2img
    num_frames: int | None = None  # a video pipeline's frames (None: its default; an image pipeline: always None)

    def weight_spec(self, name: str) -> Any:
        """What ``set_adapters`` takes for ``name``: its weight, or its block weights times it.

        >>> Generation("x", 1, 2, loras={"ink": 0.5}, blocks={"ink": {"IN04": 1.0}}).weight_spec("ink")
        {'IN04': 0.5}
        """
        spec, weight = self.blocks.get(name), float(self.loras[name])
        if spec is None:
            return weight
        if isinstance(spec, dict):
            return {label: weight * v for label, v in spec.items()}
        return [weight * v for v in spec]

    def seeds(self, count: int | None = None) -> list[int]:
        """The seed each image is drawn from. >>> Generation("x", 5, 2, seed_per_image=True).seeds(3)
        [5, 6, 7]
        """
        n = self.num_images if count is None else count
        return [self.seed + i for i in range(n)] if self.seed_per_image else [self.seed] * n


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
    """A queued request: its generation, the parsed adapters of its mix, its batch key and the future its handler
    waits on. ``gone`` is set by the handler when the client disconnects.

    >>> job = worker.submit(gen, entries); job.key == worker.submit(gen, entries).key   # doctest: +SKIP
    True
    """

    generation: Generation
    entries: list[CachedAdapter]
    key: tuple
    future: concurrent.futures.Future
    submitted: float
    gone: bool = False

    @property
    def mix(self) -> frozenset:
        """The mix as a set of (name, version, weight): equal mixes are equal sets, whatever their order."""
        return frozenset((e.name, e.version, repr(self.generation.weight_spec(e.name)),
                          self.generation.schedules.get(e.name)) for e in self.entries)

    def keyframes(self) -> dict[str, Any]:
        """Each adapter's keyframes for one image of this request (a constant weight is one keyframe)."""
        gen = self.generation
        return {e.name: gen.schedules.get(e.name) or ((0.0, float(gen.loras[e.name])),) for e in self.entries}


def batch_key(gen: Generation, entries: Sequence[CachedAdapter], *, mixed: bool) -> tuple:
    """Requests with equal keys run as one batch: the same call settings, and — unless ``mixed`` and every adapter
    takes per-sample weights — the same mix. (A missing negative prompt is its own key: SDXL encodes None as
    zeros, "" as the empty text.)

    >>> batch_key(Generation("x", 1, 2), [], mixed=False)[0]
    frozenset()
    """
    per_sample = (mixed and all(e.low_rank for e in entries) and not gen.blocks) or bool(gen.schedules)
    mix = None if per_sample else frozenset((e.name, e.version, repr(gen.weight_spec(e.name))) for e in entries)
    return (mix, gen.scale, gen.steps, gen.guidance_scale, gen.width, gen.height, gen.negative_prompt is None,
            gen.strength, gen.num_frames)


@dataclass
class Progress:
    """Where the running batch is: steps done of ``steps``, when it started, its latest latents (for a preview).

    >>> Progress(steps=20, done=5, started=0.0).eta(now=10.0)
    30.0
    """

    steps: int = 0
    done: int = 0
    started: float = 0.0
    images: int = 0
    latents: Any = None

    def eta(self, now: float | None = None) -> float:
        """Seconds left, from the pace so far (0 before the first step ends)."""
        if self.done <= 0 or self.steps <= 0:
            return 0.0
        elapsed = (time.perf_counter() if now is None else now) - self.started
        return round(elapsed / self.done * (self.steps - self.done), 3)


class BatchRun:
    """Run one batch: switch (load, set weights, build terms), generate with a step callback, split the images.

    ``should_stop()`` is asked after every step (True: :class:`BatchStopped` ends the call); ``interrupt()`` True
    makes the pipeline skip its remaining steps and decode what it has (A1111's interrupt).

    >>> images, switch_s, generate_s = BatchRun(pipe, cache, None, progress).run(batch, stop, interrupt)  # doctest: +SKIP
    """

    def __init__(self, pipe: Any, cache: AdapterCache, compiled: Any, progress: Progress) -> None:
        self.pipe, self.cache, self.compiled, self.progress = pipe, cache, compiled, progress
        self._image_pipe: Any = None

    def image_pipeline(self) -> Any:
        """diffusers' image-to-image pipeline over the same components, built on first use (``img2img.py``;
        ``ValueError`` where the family has none). >>> run.image_pipeline()  # doctest: +SKIP"""
        if self._image_pipe is None:
            self._image_pipe = image_pipeline(self.pipe)
        return self._image_pipe

    def run(self, batch: list[Job], should_stop: Any, interrupt: Any) -> tuple[list[np.ndarray], float, float]:
        """The batch's images in job order, the switch and the generate seconds."""
        t0 = time.perf_counter()
        samples = self._switch(batch)
        t1 = time.perf_counter()
        images = self._generate(batch, samples, should_stop, interrupt)
        return images, t1 - t0, time.perf_counter() - t1

    def _switch(self, batch: list[Job]) -> StepSchedule | None:
        """Make the batch's LoRAs current. One mix: exactly that mix (None returned). Several, or a schedule: every
        adapter of any mix at weight 1, and each image's own (scheduled) weights returned (one row per image)."""
        mixes = {job.mix for job in batch}
        entries = {e.name: e for job in batch for e in job.entries}
        self.cache.activate(list(entries.values()))
        if len(mixes) == 1 and not batch[0].generation.schedules:
            names = [e.name for e in batch[0].entries]
            self.pipe.set_adapters(names, [batch[0].generation.weight_spec(n) for n in names])
            rows = None
        else:
            self.pipe.set_adapters(list(entries), [1.0] * len(entries))
            rows = StepSchedule([job.keyframes() for job in batch for _ in range(job.generation.num_images)])
        self.pipe.prepare()  # build the blended terms here, so 'switch' times them and 'generate' does not
        if self.compiled is not None:
            self.compiled.sync()  # the compiled denoiser's fixed buffers, written in place: no recompile
        return rows

    def _generate(self, batch: list[Job], rows: StepSchedule | None, should_stop: Any,
                  interrupt: Any) -> list[np.ndarray]:
        """One pipeline call for the batch; each image's noise from its request's seed, as its own call draws it."""
        g = batch[0].generation
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[np.random.Generator] = []
        for job in batch:
            gen, n = job.generation, job.generation.num_images
            prompts += [gen.prompt] * n
            negatives += [gen.negative_prompt or ""] * n
            # one generator per request, drawn once per image in order: the same numbers as that request's own
            # call (one (n, …) draw); with seed_per_image one per image (seed + i)
            if gen.seed_per_image:
                generators += [np.random.Generator(np.random.PCG64(s)) for s in gen.seeds()]
            else:
                generators += [np.random.Generator(np.random.PCG64(gen.seed))] * n
        kwargs = dict(prompt=prompts, generator=generators, num_inference_steps=g.steps,
                      guidance_scale=g.guidance_scale, height=g.height, width=g.width, output_type="np")
        if g.num_frames is not None:
            kwargs["num_frames"] = g.num_frames
        if g.negative_prompt is not None:  # (Flux.2 and Flux.1 take none; a request that gives one there is a 422)
            kwargs["negative_prompt"] = negatives
        callback = self._callback(should_stop, interrupt)
        call, steps = self.pipe, g.steps
        if g.strength is not None:  # img2img: the same components through diffusers' image-to-image pipeline
            call, steps = self._image_call(batch, kwargs), min(int(g.steps * g.strength), g.steps)
        elif g.scale != 1.0:
            kwargs["cross_attention_kwargs"] = {"scale": g.scale}
        self.progress.steps, self.progress.done, self.progress.images = steps, 0, len(prompts)
        self.progress.started, self.progress.latents = time.perf_counter(), None
        # (the facade takes the scale in cross_attention_kwargs; a pipeline of its components takes it from here)
        with self.pipe.runtime.call_scale(g.scale) if call is not self.pipe else contextlib.nullcontext():
            if rows is None:
                out = call(**kwargs, callback_on_step_end=callback)  # (diffusers' __call__: no_grad)
            else:  # each image its own weights, set again after every step (a schedule moves them)
                first = [rows.row_at(b, 0, g.steps) for b in range(len(rows.rows))]
                with self.pipe.runtime.call_sample_weights(first) as samples:
                    out = call(**kwargs, callback_on_step_end=rows.callback(samples, g.steps, then=callback))
        return [np.asarray(img, dtype=np.float32) for img in pictures(out)]

    def _image_call(self, batch: list[Job], kwargs: dict) -> Any:
        """``kwargs`` made img2img's (each image its init image, noise from torch generators seeded ``seed + i``:
        diffusers' image-to-image pipelines draw with torch); the pipeline to call."""
        import inspect

        import torch

        pipe = self.image_pipeline()
        kwargs["image"] = [job.generation.init_images[i % len(job.generation.init_images)]
                           for job in batch for i in range(job.generation.num_images)]
        kwargs["generator"] = [torch.Generator().manual_seed(s) for job in batch for s in job.generation.seeds()]
        kwargs["strength"] = batch[0].generation.strength
        takes = inspect.signature(pipe.__call__).parameters
        for name in ("height", "width"):  # (SD's img2img takes the init image's size; Flux's takes them)
            if name not in takes:
                kwargs.pop(name)
        return pipe

    def _callback(self, should_stop: Any, interrupt: Any) -> Any:
        progress = self.progress

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress.done = step + 1
            progress.latents = tensors.get("latents")
            if should_stop():
                raise BatchStopped(f"stopped after step {step + 1}")
            if interrupt():
                pipe._interrupt = True  # diffusers skips the remaining steps and decodes these latents
            return tensors
        return on_step_end


__all__ = ["BatchRun", "Generation", "Job", "Progress", "Result", "batch_key"]
