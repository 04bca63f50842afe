"""The live-model core: what happens to a loaded pipeline's modules.

``model_view`` finds the adaptable modules once; ``binding`` checks an Adapter against them; ``weight_specs`` turns
``set_adapters`` weights into one weight per layer; ``lora_runtime.LoraRuntime`` keeps the books (loaded adapters,
active set, fuse / unfuse / unload) and tells each ``layer_state.LayerState`` who contributes; ``fusion`` is the one
fused-weight formula; ``transfer`` moves deltas between devices; ``compiled`` is the static (torch.compile) mode;
``control`` widens a Flux control transformer's input layer. Reach it through ``DiffusionPipeline.runtime``.
"""
