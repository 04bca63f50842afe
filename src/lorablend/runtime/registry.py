"""One ``LoraRuntime`` per denoiser module, found again by every wrapper of every pipeline that holds it.

diffusers keeps a pipeline's adapters on its modules, so two pipelines built on the same components (``from_pipe``,
``StableDiffusionPipeline(**pipe.components)``, wrapping one pipeline twice) see the same adapters and ONE active
set. Here the adapters, their hooks and their fused state live in a ``LoraRuntime``; :func:`runtime_for` hands
every ``DiffusionPipeline`` over the same denoiser the same runtime, so they share exactly as in diffusers.

The runtime lives as long as a wrapper holds it. When the last wrapper goes, its forward hooks are removed
(``weakref.finalize``): the raw pipeline is left with what its user fused, nothing else applied.

>>> rt = runtime_for({"unet": pipe.unet, "text_encoder": pipe.text_encoder})          # doctest: +SKIP
>>> runtime_for({"unet": pipe.unet, "text_encoder": pipe.text_encoder}) is rt         # doctest: +SKIP
True
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

from torch import nn

from ..naming import denoiser_component
from .lora_runtime import LoraRuntime

UNSET: Any = object()  # a setting the caller did not give (the shared runtime keeps its own)

# Module-level state, weak on both sides (this map and _SERVING below): a key dies with its denoiser, a value (a weak
# reference) with the last wrapper holding the runtime. It only answers "which runtime already serves this module?"
# — the question diffusers answers by looking at the module itself. (Not an attribute on the module: a runtime
# holds a ContextVar, which neither deepcopy nor pickle of the pipeline could take along.)
_RUNTIMES: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[LoraRuntime]]" = weakref.WeakKeyDictionary()
# Every component module -> the runtimes that serve it (weak too): pipelines with different denoisers may still share
# a text encoder (SDXL base and refiner share text_encoder_2), and two runtimes' adapters on one module would add up.
_SERVING: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _serve(runtime: LoraRuntime, components: Mapping[str, nn.Module]) -> None:
    for module in components.values():
        _SERVING.setdefault(module, weakref.WeakSet()).add(runtime)


def shared_with_others(runtime: LoraRuntime, components: list[str]) -> list[str]:
    """Which of ``components`` (names) are modules another live runtime holds adapters on: a pipeline with another
    denoiser that shares this text encoder. Loading there too would add both pipelines' LoRAs in that module.

    >>> shared_with_others(refiner.runtime, ["text_encoder_2"])                    # doctest: +SKIP
    ['text_encoder_2']
    """
    out = []
    for name in components:
        module = runtime.view.components.get(name)
        if module is None:  # (a component this pipeline lacks: binding reports it)
            continue
        others = [r for r in _SERVING.get(module, ()) if r is not runtime and r.view.components.get(name) is module]
        if any(name in r.list_adapters() or any(name in r.fused_components(n) for n in r.fused_names) for r in others):
            out.append(name)
    return out


def _release_hooks(layers: Any, release_hooks: dict) -> None:
    """What a runtime leaves when its last wrapper goes: no forward hook (unfused adapters no longer apply), no
    spare-release pre-hook. Fused weights stay as the user fused them."""
    for layer in list(layers.by_key.values()):
        if layer.handle is not None:
            layer.handle.remove()
            layer.handle = None
    for handle in release_hooks.values():
        handle.remove()
    release_hooks.clear()


def find_runtime(denoiser: nn.Module) -> LoraRuntime | None:
    """The live runtime that serves ``denoiser``, or None.

    >>> find_runtime(pipe.unet) is lorablend.DiffusionPipeline(pipe).runtime          # doctest: +SKIP
    True
    """
    ref = _RUNTIMES.get(denoiser)
    return ref() if ref is not None else None


def runtime_for(components: Mapping[str, nn.Module], *, pristine_device: Any = UNSET,
                keep_fuse_buffers: Any = UNSET, quantized_fuse_dtype: Any = UNSET,
                rounding_seed: Any = UNSET) -> LoraRuntime:
    """The runtime of these components' denoiser: the one already serving it, else a new one registered for it.

    A setting given (``pristine_device``, ``keep_fuse_buffers``, the quantized layers' ``quantized_fuse_dtype``
    and ``rounding_seed``) must match a shared runtime's: two wrappers cannot fuse in two ways into the same
    modules.

    >>> runtime_for(components_of(pipe)) is runtime_for(components_of(pipe))          # doctest: +SKIP
    True
    """
    denoiser = components[denoiser_component(components)]
    runtime = find_runtime(denoiser)
    asked = {"pristine_device": pristine_device, "keep_fuse_buffers": keep_fuse_buffers,
             "quantized_fuse_dtype": quantized_fuse_dtype, "rounding_seed": rounding_seed}
    if runtime is not None:
        held = _settings(runtime)
        clash = {k: v for k, v in asked.items() if v is not UNSET and v != held[k]}
        if clash:
            have = {k: held[k] for k in clash}
            raise ValueError(
                f"these components are already wrapped with {have} (their adapters and fused weights are shared by "
                f"every wrapper); asked for {clash}: drop that setting, or build the pipeline on its own components")
        runtime.follow(components)  # (another wrapper's pipeline may hold other text encoders: serve this one's)
        return runtime
    runtime = LoraRuntime(components, pristine_device=None if pristine_device is UNSET else pristine_device,
                          keep_fuse_buffers=False if keep_fuse_buffers is UNSET else keep_fuse_buffers)
    for name in ("quantized_fuse_dtype", "rounding_seed"):  # the quantized layers' fuse settings live on the table
        if asked[name] is not UNSET:
            setattr(runtime.layers, name, asked[name])
    _RUNTIMES[denoiser] = weakref.ref(runtime)
    _serve(runtime, components)
    weakref.finalize(runtime, _release_hooks, runtime.layers, runtime._release_hooks)
    return runtime


def _settings(runtime: LoraRuntime) -> dict[str, Any]:
    """How ``runtime`` fuses: the settings a second wrapper of the same modules must not contradict."""
    return {"pristine_device": runtime.pristine_device, "keep_fuse_buffers": runtime.keep_fuse_buffers,
            "quantized_fuse_dtype": runtime.layers.quantized_fuse_dtype,
            "rounding_seed": runtime.layers.rounding_seed}


def move_runtime(runtime: LoraRuntime, denoiser: nn.Module) -> None:
    """Register ``runtime`` as the one serving ``denoiser`` (it followed a pipeline whose denoiser was replaced;
    ``runtime.follow`` already handed the old one back), and no longer the old denoiser's.

    >>> pipe.unet = new_unet; runtime.follow(components_of(pipe)); move_runtime(runtime, new_unet)   # doctest: +SKIP
    """
    for module, ref in list(_RUNTIMES.items()):
        if ref() is runtime:
            del _RUNTIMES[module]
    _RUNTIMES[denoiser] = weakref.ref(runtime)


def follow_pipeline(runtime: LoraRuntime, components: Mapping[str, nn.Module],
                    seen: nn.Module | None) -> tuple[LoraRuntime, nn.Module]:
    """The runtime for a wrapper whose pipeline's components are no longer ``runtime``'s, and its denoiser now.
    ``seen`` is the denoiser the wrapper saw last. Its denoiser unchanged (another wrapper moved the shared runtime
    away): the runtime serving it, or a new one. Its denoiser replaced: the runtime already serving the new one if
    any (another pipeline holds it), else this runtime moves to it (``runtime.follow``: the old modules handed back).

    >>> runtime, denoiser = follow_pipeline(runtime, components_of(pipe), old_unet)     # doctest: +SKIP
    """
    denoiser = components[denoiser_component(components)]
    if denoiser is seen:
        return runtime_for(components), denoiser
    found = find_runtime(denoiser)
    if found is not None:
        found.follow(components)
        _serve(found, components)
        return found, denoiser
    runtime.follow(components)
    move_runtime(runtime, denoiser)
    _serve(runtime, components)
    return runtime, denoiser


__all__ = ["UNSET", "find_runtime", "follow_pipeline", "move_runtime", "runtime_for", "shared_with_others"]
