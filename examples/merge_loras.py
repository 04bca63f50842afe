"""The "Merge LoRAs" guide (shared/seed/merge_loras_guide.md) as one script, offline.

Each guide snippet below is copied as is; only the import line and the dtype argument changed
(``from lorablend import DiffusionPipeline``, ``import torch``, ``torch_dtype=torch.float16``).

So that the guide's repo ids resolve without a network, ``setup_offline_hub`` (not part of the guide) builds a
tiny SDXL pipeline and two LoRA files (kohya with SGM names, and diffusers format) and puts them in a local
hub cache under those ids, then the script runs with ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``:
``from_pretrained`` and ``load_lora_weights`` go through huggingface_hub exactly as they would online.
``push_to_hub`` is emulated by publishing the saved folder into that cache as ``username/fused-ikea-feng``
(set ``LORABLEND_EXAMPLE_PUSH=1`` and a token to really push).

Where the guide is wrong: its last snippet says ``unfuse_lora`` only works for one fused LoRA. Here it
restores the original weights bit for bit with both LoRAs fused (even after ``unload_lora_weights``), which
``section_unfuse`` checks. Run: ``python examples/merge_loras.py [output-folder]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# huggingface_hub reads these when it is imported: set them before anything imports it.
WORK = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lorablend-example-")).resolve()
os.environ["HF_HUB_CACHE"] = str(WORK / "hub-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("LORABLEND_EXAMPLE_PUSH") else "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

COMMIT = "0" * 40  # the snapshot revision our local cache entries live under


def publish_to_local_hub(folder: Path, repo_id: str) -> None:
    """Lay ``folder`` out as huggingface_hub's cache does for ``repo_id`` at revision ``main``."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def setup_offline_hub() -> None:
    """Not part of the guide: the tiny stand-ins for the guide's model and LoRA repos."""
    from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline
    from lorablend.io import save_adapter

    staging = WORK / "staging"
    pipe = tiny_pipeline("sdxl")
    # The guide's calls take the model's default size and diffusers' 50 steps; in float16 on a CPU (slow half
    # convolutions) the tiny SDXL's 64x64 default took 6 minutes of the test suite. The stand-in's default image
    # is 16x16 (latents 8x8): the same guide code path, about a tenth of the work.
    pipe.unet.register_to_config(sample_size=8)
    pipe.save_pretrained(staging / "sdxl")
    publish_to_local_hub(staging / "sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    ikea = random_adapter(pipe, "ikea", rank=4, alpha=2.0, seed=1)
    feng = random_adapter(pipe, "feng", rank=8, alpha=8.0, seed=2, targets="attn")
    save_adapter(ikea, staging / "ikea" / "ikea_instructions_xl_v1_5.safetensors", format="kohya", target=pipe)
    save_adapter(feng, staging / "feng" / "fengzikai_v1.0_XL.safetensors", format="diffusers", target=pipe)
    publish_to_local_hub(staging / "ikea", "ostris/ikea-instructions-lora-sdxl")
    publish_to_local_hub(staging / "feng", "lordjia/by-feng-zikai")


# ---------------------------------------------------------------------------------------------------------
# The guide. Sections as in the guide; each body is the guide's snippet.


def section_load():
    from lorablend import DiffusionPipeline
    import torch
    import numpy as np

    pipeline = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    pipeline.load_lora_weights("ostris/ikea-instructions-lora-sdxl", weight_name="ikea_instructions_xl_v1_5.safetensors", adapter_name="ikea")
    pipeline.load_lora_weights("lordjia/by-feng-zikai", weight_name="fengzikai_v1.0_XL.safetensors", adapter_name="feng")
    return pipeline


def section_set_adapters(pipeline):
    import numpy as np

    pipeline.set_adapters(["ikea", "feng"], adapter_weights=[0.7, 0.8])

    generator = np.random.Generator(np.random.PCG64(0))
    prompt = "A bowl of ramen shaped like a cute kawaii bear, by Feng Zikai"
    image = pipeline(prompt, generator=generator, cross_attention_kwargs={"scale": 1.0})[0][0]
    image
    return image


def section_fuse_lora():
    from lorablend import DiffusionPipeline
    import torch

    pipeline = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    pipeline.load_lora_weights("ostris/ikea-instructions-lora-sdxl", weight_name="ikea_instructions_xl_v1_5.safetensors", adapter_name="ikea")
    pipeline.load_lora_weights("lordjia/by-feng-zikai", weight_name="fengzikai_v1.0_XL.safetensors", adapter_name="feng")

    pipeline.set_adapters(["ikea", "feng"], adapter_weights=[0.7, 0.8])

    pipeline.fuse_lora(adapter_names=["ikea", "feng"], lora_scale=1.0)

    pipeline.unload_lora_weights()
    # save locally
    pipeline.save_pretrained("path/to/fused-pipeline")
    # save to the Hub
    if os.environ.get("LORABLEND_EXAMPLE_PUSH"):
        pipeline.push_to_hub("fused-ikea-feng")
    else:  # offline stand-in for push_to_hub: the same folder, published into the local hub cache
        publish_to_local_hub(Path("path/to/fused-pipeline"), "username/fused-ikea-feng")
    return pipeline


def section_reload():
    from lorablend import DiffusionPipeline
    import torch
    import numpy as np

    pipeline = DiffusionPipeline.from_pretrained(
        "username/fused-ikea-feng", torch_dtype=torch.float16,
    )

    image = pipeline("A bowl of ramen shaped like a cute kawaii bear, by Feng Zikai", generator=np.random.Generator(np.random.PCG64(0)))[0][0]
    image
    return image


def section_unfuse(pipeline):
    pipeline.unfuse_lora()


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    import numpy as np
    import torch

    setup_offline_hub()
    os.chdir(WORK)  # the guide's relative "path/to/fused-pipeline" lands in the work folder

    pipeline = section_load()
    blended = section_set_adapters(pipeline)
    fused = section_fuse_lora()
    reloaded = section_reload()

    # Not in the guide: the unfuse it says needs a single LoRA, on the pipeline that fused two.
    from lorablend import DiffusionPipeline

    original = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    section_unfuse(fused)
    exact = all(torch.equal(a, b) for a, b in zip(fused.unet.state_dict().values(), original.unet.state_dict().values()))
    print(f"unfuse_lora with 2 fused LoRAs (after unload) restored every UNet weight bit for bit: {exact}")

    diff = float(np.abs(np.asarray(blended, dtype=np.float32) - np.asarray(reloaded, dtype=np.float32)).max())
    print(f"blended image vs reloaded fused pipeline image: max pixel difference {diff:.0f} / 255")
    blended.save(WORK / "set_adapters.png")
    reloaded.save(WORK / "fused_reloaded.png")
    print(f"images written to {WORK}")
    return 0 if exact and diff <= 8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
