"""``DiffusionPipeline``: the LoRA API of diffusers' "Merge LoRAs" guide on a diffusers SD1.x / SDXL / Flux.1 / SD3
pipeline (a ``unet`` or a ``transformer`` denoiser).

Generation is diffusers' own; this class adds the LoRA methods (same names and arguments as diffusers)
on top of the exact runtime in ``runtime.py``, and delegates everything else to the wrapped pipeline
(``pipeline.unet``, ``pipeline.to(...)``, ``pipeline.enable_model_cpu_offload()``, ...).

Where the guide is wrong, this is what is true here:

* "unfuse only works if you've only fused one LoRA; if you've fused multiple LoRAs you'll need to reload
  the model": ``unfuse_lora()`` restores the original weights **bit for bit** for any number of fused
  adapters, in every dtype (the pristine weights are copied back, never subtracted), and
  ``unfuse_lora(adapter_names=[...])`` unfuses some adapters and leaves the others fused. It even works after
  ``unload_lora_weights()``.
* "``scale`` won't work in ``cross_attention_kwargs`` after fusing": with fused adapters, a ``scale`` other
  than 1.0 raises a clear error instead of being silently ignored; ``fuse_lora(lora_scale=...)`` is the way.
* A runtime ``scale`` applies to that call only (UNet and text encoders); ``scale=0`` does not erase the
  ``set_adapters`` weights (it does in diffusers + PEFT).
* A pipeline reloaded from a folder saved after fuse → unload → ``save_pretrained`` has the LoRA baked in:
  there is nothing to unfuse there (``unfuse_lora`` says so); keep the original base model to go back.

>>> pipeline = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)  # doctest: +SKIP
>>> pipeline.load_lora_weights("ostris/ikea-instructions-lora-sdxl", weight_name="ikea_instructions_xl_v1_5.safetensors", adapter_name="ikea")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import weakref
from typing import Any, Sequence

import numpy as np
import torch

from .io import hub
from .adapter import Adapter
from .errors import LoraCompatibilityError, LoraFormatError
from .report import LoadReport
from .runtime.model_view import ModelView
from .runtime.binding import bind_adapter
from .runtime.lora_runtime import LoraRuntime
from .runtime.schedule import scheduled_call
from .runtime.registry import UNSET, follow_pipeline, runtime_for, shared_with_others
from .naming import components_of, denoiser_component
from .images.noise import host_normal as _host_normal, is_numpy_generator as _is_numpy_generator
from .images.noise import host_noise_in_prepare_latents as _host_noise_in_prepare_latents
from .images.noise import seeded_for_the_rest as _seeded_for_the_rest

logger = logging.getLogger(__name__)
_OWN = ("pipe", "_runtime", "_rt", "_seen")


def _fetch(source: Any, weight_name: str | None, hub_kwargs: dict) -> Any:
    """``hub.fetch_lora``, with a local path that exists but holds no readable LoRA (an empty folder, one with
    several weight files, a symlink loop) refused as a ``LoraFormatError`` like every other unreadable file."""
    try:
        return hub.fetch_lora(source, weight_name=weight_name, **hub_kwargs)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, LoraFormatError) or not isinstance(source, (str, os.PathLike)) or not os.path.lexists(source):
            raise
        raise LoraFormatError(str(e)) from None


# diffusers' names for the attention kwargs (the call-time LoRA scale rides in them), by pipeline
_ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


class DiffusionPipeline:
    """A diffusers pipeline with lorablend's LoRA runtime.

    ``DiffusionPipeline(pipe)`` wraps a pipeline you already built; ``DiffusionPipeline.from_pretrained``
    builds one. ``pristine_device`` is where pristine copies of fused weights live (default: next to the
    weight; ``"cpu"`` trades restore speed for device memory). ``keep_fuse_buffers=True`` keeps the fused
    weight tensors after ``unfuse_lora`` and writes the next ``fuse_lora`` into them: for switching LoRA
    combinations often (no allocation, and on a CPU no page faults, per switch), at the cost of holding one
    copy of the touched weights while unfused too (never more than one copy at any time).
    On quantized layers (README, "Quantized bases"), ``fuse_lora`` requantizes into the layer's own format unless
    ``quantized_fuse_dtype`` names a float dtype (``torch.bfloat16``): then each touched layer computes with a float
    copy of its fused weight, its quantized bytes untouched. ``rounding_seed`` seeds fp8's stochastic rounding
    (the same seed, the same fused bytes).

    >>> from diffusers import StableDiffusionXLPipeline                      # doctest: +SKIP
    >>> pipeline = DiffusionPipeline(StableDiffusionXLPipeline.from_pretrained(path))   # doctest: +SKIP
    """

    def __init__(self, pipe: Any, *, pristine_device: str | torch.device | None = UNSET, keep_fuse_buffers: bool = UNSET,
                 quantized_fuse_dtype: torch.dtype | None = UNSET, rounding_seed: int = UNSET):
        if isinstance(pipe, DiffusionPipeline):
            pipe = pipe.pipe
        if denoiser_component(pipe) is None:
            raise TypeError(
                "DiffusionPipeline wraps a diffusers SD1.x / SDXL (unet) or Flux.1 / SD3 (transformer) pipeline; "
                f"got {type(pipe).__name__}, which has neither"
            )
        object.__setattr__(self, "pipe", pipe)
        components = components_of(pipe)
        runtime = runtime_for(components, pristine_device=pristine_device, keep_fuse_buffers=keep_fuse_buffers,
                              quantized_fuse_dtype=quantized_fuse_dtype, rounding_seed=rounding_seed)
        object.__setattr__(self, "_rt", runtime)
        object.__setattr__(self, "_seen", weakref.ref(components[denoiser_component(components)]))

    @property
    def _runtime(self) -> LoraRuntime:
        """The runtime of the pipeline as it is NOW: every public call comes through here, so a component replaced
        after wrapping (``pipeline.unet = new_unet``) is seen at the next call, never a stale module (a few
        attribute reads when nothing changed). A replaced text encoder: the runtime follows it (adapters on the old
        module dropped from it, as diffusers' stay on the module). A replaced denoiser: the runtime already serving
        the new one if any (another pipeline shares it), else this runtime moves to it the same way."""
        runtime, components = self._rt, components_of(self.pipe)
        held = runtime.view.components
        if any(held.get(c) is not components.get(c) for c in held.keys() | components.keys()):
            runtime, denoiser = follow_pipeline(runtime, components, self._seen())
            object.__setattr__(self, "_rt", runtime)
            object.__setattr__(self, "_seen", weakref.ref(denoiser))
        return runtime

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> "DiffusionPipeline":
        """Build the diffusers pipeline (``diffusers.DiffusionPipeline.from_pretrained``) and wrap it.

        >>> pipeline = DiffusionPipeline.from_pretrained("path/to/fused-pipeline", torch_dtype=torch.float16)  # doctest: +SKIP
        """
        import diffusers

        own = {k: kwargs.pop(k) for k in ("pristine_device", "keep_fuse_buffers", "quantized_fuse_dtype",
                                           "rounding_seed") if k in kwargs}
        pipe = diffusers.DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        from .io.saved_adapters import reload_saved_adapters

        pipeline = cls(pipe, **own)
        if os.path.isdir(pretrained_model_name_or_path):  # unfused adapters saved beside the components
            reload_saved_adapters(pipeline, pretrained_model_name_or_path)
        return pipeline

    # ------------------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        if name in _OWN or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            raise AttributeError(f"{name} cannot be replaced")
        setattr(self.pipe, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.pipe)))

    @property
    def model_view(self) -> ModelView:
        """The adaptable part of the wrapped pipeline: its components, their module index (``.family``,
        ``.index.modules``) and the live module of every target key.

        >>> pipeline.model_view.family                                     # doctest: +SKIP
        'sdxl'
        """
        return self._runtime.view

    @property
    def runtime(self) -> LoraRuntime:
        """The LoRA runtime behind this pipeline: loaded adapters (``.adapters``), the per-layer table
        (``.layers``), ``prepare()``, ``memory()``, ``call_scale(s)``. The pipeline's methods are the guide's API;
        the runtime is for tools that time or inspect it (the server, sweeps, benchmarks).

        >>> sorted(pipeline.runtime.adapters)                                # doctest: +SKIP
        ['feng', 'ikea']
        """
        return self._runtime

    @property
    def denoiser_name(self) -> str:
        """The component that denoises: ``"unet"`` (SD1.x / SDXL) or ``"transformer"`` (Flux.1, SD3).

        >>> pipeline.denoiser_name                                           # doctest: +SKIP
        'unet'
        """
        return denoiser_component(self.pipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoising module itself (``pipeline.unet`` or ``pipeline.transformer``).

        >>> pipeline.denoiser.config.sample_size                             # doctest: +SKIP
        128
        """
        return getattr(self.pipe, self.denoiser_name)

    def prepare(self) -> None:
        """Build the blended terms of the current mix now (each layer's ONE term), so that the next generation
        starts computing at once: a server or a sweep calls this right after ``set_adapters`` to time the switch
        apart from the generation. Never needed for correctness (a stale layer rebuilds on its next forward).

        >>> pipeline.set_adapters(["ikea", "feng"], [0.7, 0.8]); pipeline.prepare()   # doctest: +SKIP
        """
        self._runtime.prepare()

    def __repr__(self) -> str:
        return f"lorablend.DiffusionPipeline({type(self.pipe).__name__}, adapters={list(self._runtime.adapters)})"

    def to(self, *args: Any, **kwargs: Any) -> "DiffusionPipeline":
        """Move the pipeline like diffusers' ``to`` and return this wrapper (so chaining keeps the LoRA API)."""
        self.pipe.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------------------ generation
    def __call__(
        self,
        *args: Any,
        generator: Any = None,
        cross_attention_kwargs: dict | None = None,
        joint_attention_kwargs: dict | None = None,
        lora_schedule: dict | None = None,
        **kwargs: Any,
    ):
        """Generate with diffusers; returns diffusers' output (``out[0][0]`` and ``out.images[0]`` both work).

        ``lora_schedule={"detail": [[0, 1.0], [0.6, 0.0]]}`` (or sd-webui-loractl's ``"1.0@0,0@0.6"``) changes an
        active adapter's weight over the steps: keyframes (position in [0, 1] of the steps, weight times its
        ``set_adapters`` weight), linear between them; only weight vectors change between steps
        (``runtime/schedule.py``; low-rank adapters, unfused).

        ``generator`` may be a ``torch.Generator`` (passed to diffusers) or a ``np.random.Generator`` / a list
        of them, one per image: the initial latents are then drawn on the host with
        ``generator.standard_normal(shape)`` (packed as the pipeline packs them, for Flux), so a seed gives the
        same latents on every device (a video's frames too). ``cross_attention_kwargs={"scale": s}`` (SD1.x /
        SDXL), ``joint_attention_kwargs={"scale": s}`` (Flux, SD3, Z-Image, Chroma) or ``attention_kwargs={"scale":
        s}`` (Qwen-Image, Wan, Flux.2: diffusers' names there; every spelling is accepted on every pipeline) scales
        the unfused adapters in the denoisers and the text encoders for this call only.

        >>> image = pipeline("a bowl of ramen", generator=np.random.Generator(np.random.PCG64(0)))[0][0]  # doctest: +SKIP
        """
        given = [k for k in (cross_attention_kwargs, joint_attention_kwargs, kwargs.pop("attention_kwargs", None))
                 if k is not None]
        if len(given) > 1:
            raise ValueError("pass one of cross_attention_kwargs (SD1.x / SDXL), joint_attention_kwargs (Flux, SD3, "
                             "Z-Image, Chroma) or attention_kwargs (Qwen-Image, Wan, Flux.2), not several")
        attention_kwargs = dict(given[0]) if given else {}
        scale = attention_kwargs.pop("scale", 1.0)
        parameters = inspect.signature(self.pipe.__call__).parameters
        spelling = next((k for k in _ATTENTION_KWARGS if k in parameters), None)
        if spelling is not None:  # (the pipeline's own name for them; the scale is ours, never passed on)
            kwargs[spelling] = attention_kwargs or None
        elif attention_kwargs:
            raise TypeError(f"{type(self.pipe).__name__} takes no attention kwargs; got {sorted(attention_kwargs)}")
        host_noise = contextlib.nullcontext()
        if _is_numpy_generator(generator):
            if kwargs.get("latents") is not None:
                raise ValueError("pass either latents= or a numpy generator, not both")
            if isinstance(getattr(self.pipe, "unet", None), torch.nn.Module):
                kwargs["latents"] = self._host_latents(generator, args, kwargs)
                generator = None
            else:  # a transformer pipeline sizes (and packs) its latents inside prepare_latents: draw them there
                host_noise = _host_noise_in_prepare_latents(self.pipe, generator)
                generator = _seeded_for_the_rest(generator, self.pipe._execution_device)
        with self._runtime.call_scale(scale), host_noise:
            if lora_schedule is not None:
                steps = kwargs.get("num_inference_steps") or parameters["num_inference_steps"].default
                return scheduled_call(self._runtime, lora_schedule, functools.partial(self.pipe, *args,
                                      generator=generator), kwargs, int(steps))
            return self.pipe(*args, generator=generator, **kwargs)

    def _host_latents(self, generator: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """Initial latents of a UNet pipeline drawn on the host from numpy generator(s) (see ``__call__``)."""
        pipe = self.pipe
        signature = inspect.signature(pipe.__call__)
        if "latents" not in signature.parameters:
            raise TypeError(f"{type(pipe).__name__} takes no latents=; pass a torch.Generator instead")
        params = signature.bind_partial(*args, **kwargs).arguments
        prompt, embeds = params.get("prompt"), params.get("prompt_embeds")
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        elif embeds is not None:
            batch = int(embeds.shape[0])
        else:
            raise ValueError("pass a prompt or prompt_embeds")
        batch *= params.get("num_images_per_prompt") or 1
        scale_factor = pipe.vae_scale_factor
        default = pipe.unet.config.sample_size * scale_factor
        height, width = params.get("height") or default, params.get("width") or default
        shape = (pipe.unet.config.in_channels, int(height) // scale_factor, int(width) // scale_factor)
        # diffusers' prepare_latents multiplies given latents by scheduler.init_noise_sigma itself.
        return torch.from_numpy(_host_normal(generator, batch, shape)).to(
            device=pipe._execution_device, dtype=pipe.unet.dtype)

    # ------------------------------------------------------------------------------ loading
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Any = None,
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        strict: bool = True,
        hotswap: bool = False,
        high: Any = None,
        low: Any = None,
        **kwargs: Any,
    ) -> LoadReport:
        """Load a LoRA (file, folder, repo id, state dict or ``Adapter``) into the UNet and text encoders.

        The whole adapter is checked against the pipeline first; on any problem nothing changes and one
        ``LoraCompatibilityError`` names the first offending keys. ``strict=False`` applies the layers that
        fit. The new adapter becomes the active one with weight 1 (as in diffusers). ``hotswap=True``
        replaces the tensors of the loaded adapter ``adapter_name``, keeping its activation and weights.
        Returns the per-key ``LoadReport``. Wan 2.2 A14B (two experts): ``high=`` / ``low=`` load a pair of files
        as ONE adapter, each on its expert (``transformer`` / ``transformer_2``); either alone targets that expert
        only, as diffusers' ``load_into_transformer_2=True`` does for the low one (``runtime/experts.py``).

        >>> report = pipeline.load_lora_weights("ostris/ikea-instructions-lora-sdxl",
        ...     weight_name="ikea_instructions_xl_v1_5.safetensors", adapter_name="ikea")   # doctest: +SKIP
        """
        kwargs.pop("low_cpu_mem_usage", None)  # always "low": nothing is randomly initialised
        if kwargs.pop("load_into_transformer_2", False):
            low, pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict, None
        if high is not None or low is not None:
            from .runtime.experts import pair_of

            name = adapter_name or self._default_adapter_name()
            adapter, checked = pair_of(self.pipe, pretrained_model_name_or_path_or_dict, high, low, name,
                                       lambda source: self._read(source, name, weight_name, kwargs)[0]), False
        else:
            adapter, checked = self._read(pretrained_model_name_or_path_or_dict, adapter_name, weight_name, kwargs)
        from .runtime.control import unwiden, widen_for_control

        layers, widened = self._runtime.layers.by_key, []
        if shared := shared_with_others(self._runtime, adapter.components()):
            raise LoraCompatibilityError(
                f"adapter {adapter.name!r}: {shared} of this pipeline also serve another pipeline (another denoiser) "
                f"that holds adapters there, and both would apply: load it through that pipeline, or give this one "
                f"its own {shared} (nothing was changed)")
        fused_norms = [k for k in adapter.replacements if k in layers and layers[k].pristine_weight is not None]
        if fused_norms:
            raise ValueError(f"adapter {adapter.name!r} replaces the weights of {fused_norms}, which have adapters "
                             f"fused into them: unfuse_lora() first (nothing was changed)")
        if adapter.needs_control:  # a Flux control LoRA: widen x_embedder on a control pipeline, else refuse
            busy = {k for k in adapter.widened_inputs
                    if k in layers and (layers[k].loaded or layers[k].pristine_weight is not None)}
            if widened := widen_for_control(self.pipe, adapter, self._runtime.view, busy=busy):
                self._runtime.follow(components_of(self.pipe), reindex=True)  # the index reads the new width
        bound = None
        try:
            if adapter.deltas or not adapter.replacements:  # (norms alone: nothing to add, as in diffusers)
                bound = bind_adapter(adapter, self._runtime.view, strict=strict, checked=checked)
                self._runtime.add(bound, replace_existing=hotswap)
        except BaseException:  # a load that fails changes nothing: the widening it made goes too
            if widened:
                unwiden(self._runtime.view.components, widened)
                self._runtime.follow(components_of(self.pipe), reindex=True)
            raise
        if adapter.replacements:  # whole norm weights (diffusers' Flux norm keys): in place now, back on unload
            from .runtime.control import replace_norms

            replace_norms(self._runtime.view.components, adapter.replacements)
        return adapter.report if bound is None else bound.report

    def _read(self, source: Any, adapter_name: str | None, weight_name: str | None, hub_kwargs: dict):
        """(the adapter of one LoRA source, named; whether its names and shapes were checked against this pipeline)"""
        source = _fetch(source, weight_name, hub_kwargs)
        if isinstance(source, Adapter):
            return dataclasses.replace(source, name=adapter_name or source.name), False
        from .io import load_adapter

        view = self._runtime.view  # names resolved, shapes and values checked here, once: binding trusts them
        name = adapter_name or self._default_adapter_name()
        return load_adapter(source, target=view.index, name=name, device=view.shared_accelerator()), True

    def _default_adapter_name(self) -> str:
        n = len(self._runtime.adapters)
        while f"default_{n}" in self._runtime.adapters or f"default_{n}" in self._runtime.fused_names:
            n += 1
        return f"default_{n}"

    # ------------------------------------------------------------------------------ blending
    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        """Activate exactly these adapters, each with a weight: a float, a per-component dict
        ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``, diffusers' per-block dict
        ``{"unet": {"down": ..., "mid": ..., "up": {"block_0": [...]}}}`` or block labels
        ``{"IN04": 0.5, "M00": 0.0, "BASE": 1.0}`` (every layer of a block: resnets and samplers too).
        The blend is exact: ``W0 + Σ w_i ΔW_i``.

        >>> pipeline.set_adapters(["ikea", "feng"], adapter_weights=[0.7, 0.8])      # doctest: +SKIP
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights: list[Any] = [None] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            if len(adapter_weights) != len(names):
                raise ValueError(
                    f"set_adapters: {len(adapter_weights)} weights for {len(names)} adapters {names}; "
                    "give one weight per adapter"
                )
            weights = list(adapter_weights)
        else:
            weights = [adapter_weights] * len(names)
        self._runtime.set_adapters(names, weights)

    def get_active_adapters(self) -> list[str]:
        """The active adapters, in ``set_adapters`` order. >>> pipeline.get_active_adapters()  # doctest: +SKIP"""
        return list(self._runtime.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [loaded adapter names]}``. >>> pipeline.get_list_adapters()  # doctest: +SKIP"""
        return self._runtime.list_adapters()

    def enable_lora(self) -> None:
        """Turn the (unfused) active adapters back on. >>> pipeline.enable_lora()  # doctest: +SKIP"""
        self._runtime.set_enabled(True)

    def disable_lora(self) -> None:
        """Turn off the unfused adapters (kept loaded); fused ones stay in the weights until ``unfuse_lora``.

        >>> pipeline.disable_lora()                                           # doctest: +SKIP
        """
        self._runtime.set_enabled(False)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove adapters. A fused adapter stays fused (``unfuse_lora`` still restores the weights).

        >>> pipeline.delete_adapters("ikea")                                 # doctest: +SKIP
        """
        self._runtime.delete([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def set_lora_device(self, adapter_names: str | Sequence[str], device: str | torch.device) -> None:
        """Park the stored tensors of these adapters on ``device`` (e.g. ``"cpu"``); the blended per-layer
        term of the active ones stays on each module's device.

        >>> pipeline.set_lora_device(["feng"], "cpu")                        # doctest: +SKIP
        """
        self._runtime.move_adapters([adapter_names] if isinstance(adapter_names, str) else list(adapter_names), device)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        *,  # PEFT's callers pass the first four by position; the rest by name
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Merge loaded adapters into a new one (``lorablend.merge``; PEFT's argument names), not activated.

        ``svd`` is the optimal rank-``svd_rank`` approximation of ``Σ w_i ΔW_i`` with each alpha/rank scale
        applied once; ``cat`` is exact. ``svd_full_matrices`` and ``svd_driver`` are accepted for PEFT
        compatibility and have no effect (the SVD is taken from the factors).

        >>> pipeline.add_weighted_adapter(["ikea", "feng"], [0.7, 0.8], "mix", combination_type="cat")  # doctest: +SKIP
        """
        from .merge import merge

        names = [adapters] if isinstance(adapters, str) else list(adapters)
        self._runtime.check_names(names, "add_weighted_adapter")
        if len(weights) != len(names):
            raise ValueError(f"add_weighted_adapter: {len(weights)} weights for {len(names)} adapters {names}")
        if adapter_name in self._runtime.adapters or adapter_name in self._runtime.fused_names:
            raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} already exists")
        sources = []
        for n in names:
            bound = self._runtime.adapters[n]
            sources.append(Adapter(n, bound.adapter.family, {k: l.delta for k, l in bound.layers.items()},
                                   dict(bound.adapter.metadata)))
        merged = merge(
            sources,
            list(weights),
            combination_type,
            rank=svd_rank,
            clamp=svd_clamp,
            density=density,
            majority_sign=majority_sign_method,
            name=adapter_name,
            base_weights=self._runtime.pristine_weight,
        )
        bound = bind_adapter(merged, self._runtime.view, strict=True)
        self._runtime.add(bound, activate=False)

    # ------------------------------------------------------------------------------ fuse
    def fuse_lora(
        self,
        components: Sequence[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        """Write ``W0 + lora_scale · Σ w_i ΔW_i`` into the weights (fp32 from the pristine ``W0``, cast once).

        ``adapter_names`` defaults to the active adapters; the weights are their ``set_adapters`` weights.
        ``safe_fusing=True`` refuses NaN/Inf results. Any failure leaves every weight as it was. Fusing an
        adapter that is already fused is an error (unfuse first).

        >>> pipeline.fuse_lora(adapter_names=["ikea", "feng"], lora_scale=1.0)   # doctest: +SKIP
        """
        self._runtime.fuse(adapter_names, components, lora_scale, safe_fusing)

    def unfuse_lora(self, components: Sequence[str] | None = None, adapter_names: Sequence[str] | None = None) -> None:
        """Restore the pristine weights bit for bit (any number of fused adapters, any dtype).

        With ``adapter_names``, only those are unfused; the others stay fused (re-fused from the pristine
        weights, so the result equals fusing only them).

        >>> pipeline.unfuse_lora()                                            # doctest: +SKIP
        """
        self._runtime.unfuse(adapter_names, components)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Drop every adapter. What is fused stays fused (the guide's fuse → unload → save recipe), and can
        still be unfused. Norm weights a file replaced get their originals back (bit for bit).
        ``reset_to_overwritten_params=True`` also puts back what a Flux control LoRA widened: ``x_embedder``'s
        original weight and width and the transformer's ``config.in_channels`` (so ``FluxPipeline.from_pipe`` works
        again), as diffusers does; a widened layer with fused adapters is refused first (unfuse it).

        >>> pipeline.unload_lora_weights(reset_to_overwritten_params=True)   # doctest: +SKIP
        """
        from .runtime.control import overwritten, restore_overwritten

        runtime = self._runtime
        components = runtime.view.components
        if reset_to_overwritten_params:
            widened = [f"{c}.{path}" for c, m in components.items() for path in overwritten(m)["widened"]]
            layers = runtime.layers.by_key
            fused = [k for k in widened if k in layers and layers[k].pristine_weight is not None]
            if fused:
                raise ValueError(f"unload_lora_weights(reset_to_overwritten_params=True): {fused} have adapters fused "
                                 f"into their widened weights; unfuse_lora() first (nothing was changed)")
        runtime.unload()
        restored = [restore_overwritten(m, widened=bool(reset_to_overwritten_params)) for m in components.values()]
        if any(restored):
            runtime.follow(components_of(self.pipe), reindex=True)  # the index reads the widths as they are again

    @property
    def num_fused_loras(self) -> int:
        return len(self._runtime.fused_names)

    @property
    def fused_loras(self) -> set[str]:
        return set(self._runtime.fused_names)

    # ------------------------------------------------------------------------------ compiled denoiser
    def compile_denoiser(
        self,
        *,
        max_rank: int = 64,
        grow: bool = True,
        backend: Any = "inductor",
        mode: str | None = None,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        options: dict | None = None,
        per_sample: bool = False,
    ) -> Any:
        """Run the denoiser (the UNet) under ``torch.compile`` in static mode: switching adapters, weights,
        enable/disable and ``cross_attention_kwargs={"scale": s}`` then writes fixed buffers in place, with no
        graph break and no recompile (``docs/compile.md``); so do per-sample weights (mixed batches,
        ``lora_schedule``), which ``per_sample=True`` prepares for up front. Text encoders stay eager. Returns the
        ``compiled.StaticDenoiser`` (``.sync()``, ``.close()``, ``.capacity``, ``.memory()``).

        >>> pipeline.compile_denoiser(max_rank=64)                           # doctest: +SKIP
        """
        from .runtime.compiled import compile_denoiser

        return compile_denoiser(self._runtime, max_rank=max_rank, grow=grow, backend=backend, mode=mode,
                                fullgraph=fullgraph, dynamic=dynamic, options=options, per_sample=per_sample)

    # ------------------------------------------------------------------------------ save / push
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``: the weights as they are, fused adapters included, and the loaded adapters
        that are not fused beside them (``lorablend_adapters/``: each adapter's file, the active set and weights),
        which ``from_pretrained`` loads back, so the reloaded pipeline makes the same images (io/saved_adapters.py).
        An adapter fused into some of its components only is refused before anything is written.

        >>> pipeline.save_pretrained("path/to/pipeline")                     # doctest: +SKIP
        """
        from .io.saved_adapters import plan_saved_adapters, write_saved_adapters

        plan = plan_saved_adapters(self._runtime)  # (every check and every tensor first: a refusal writes nothing)
        self.pipe.save_pretrained(save_directory, **kwargs)
        write_saved_adapters(save_directory, plan)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """diffusers' ``push_to_hub`` (uploads the weights as diffusers' ``save_pretrained`` writes them). Loaded
        adapters that are not fused would not be in the upload: refused, with the ways out.

        >>> pipeline.push_to_hub("fused-ikea-feng")                          # doctest: +SKIP
        """
        runtime = self._runtime
        unfused = [n for n, bound in runtime.adapters.items()
                   if set(runtime.fused_components(n)) != set(bound.components())]
        if unfused:
            raise ValueError(
                f"push_to_hub: loaded adapters {unfused} are unfused, so they are not in the weights it uploads. "
                f"fuse_lora() then unload_lora_weights() to bake them in, unload_lora_weights() to upload the base "
                f"weights, or save_pretrained(folder) (which keeps them) and upload that folder (nothing was uploaded)")
        return self.pipe.push_to_hub(repo_id, **kwargs)
