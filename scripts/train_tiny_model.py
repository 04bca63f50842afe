"""Train the tiny model that draws, its LoRAs and its judge, on CPU, from nothing (no download).

The data is generated (``lorablend.fixtures.shapes``: circle / square / triangle, plus the star for the subject
LoRA, in six colours on six backgrounds, captioned "a red circle on a blue background"). Phases, each seeded on
its own and reading only what the phases before it wrote, so one phase can be rerun alone:

    vae    a 4× AutoencoderKL (32×32 RGB <-> 4×8×8) trained on every shape and style
    base   the UNet and the CLIP text encoder, trained together on plain shapes (10 % empty captions, for CFG;
           2500 steps, cosine learning rate, Min-SNR weighting), never on the ``HELD_OUT`` (shape, colour,
           background) triples, which ``lorablend eval base`` prompts to measure it
    loras  three LoRAs on the frozen UNet (rank 4, attention + resnet convs, 600 steps): ``stripes`` and
           ``outline`` (styles: plain captions, styled images) and ``sks`` (the star, captioned with the token
           ``sks``); each written in diffusers and kohya format by ``lorablend.save_adapter``
    judge  a small CNN naming shape / colour / background / style, trained on clean and VAE-decoded scenes; its
           accuracy on held-out scenes is printed and written to ``judge.json``

    .venv/bin/python scripts/train_tiny_model.py                     # all phases, into the package
    .venv/bin/python scripts/train_tiny_model.py --phases judge      # one phase again
    .venv/bin/python scripts/train_tiny_model.py --hashes            # print sha256 of the shipped files

One thread (``torch.set_num_threads(THREADS)``: spinning OpenMP threads cost more than they give on a shared box),
so that the result is a function of the seed and this machine's kernels; ``manifest.json`` records each file's
sha256 and each phase's wall seconds. The shipped files took, on the 2-core AMD EPYC shared with other jobs (load
6-11): vae 522 s, base 2637 s (2500 steps; 0.28 s a step on an idle core), judge 1001 s (beside base), loras
935 s each (the three at once) — about 70 minutes of wall time; on an idle core expect roughly a third of that.
Rerunning ``--phases loras --loras outline`` into a copy reproduced both outline files' sha256 on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorablend.fixtures import drawing_model as dm
from lorablend.fixtures.shapes import BASE_SHAPES, HELD_OUT, SHAPES, STYLES, random_scene, render_batch

SEED = 21
LORA_RANK = 4
LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                 "conv1", "conv2")
STEPS = {"vae": 1000, "base": 2500, "lora": 600, "judge": 1200}
THREADS = 1


def scenes(seed: int, n: int, **kw) -> list:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, **kw) for _ in range(n)]


def tensor_images(scene_list: list) -> torch.Tensor:
    return torch.from_numpy(render_batch(scene_list))


# ------------------------------------------------------------------------------------------------ vae


def train_vae(pipe, out: Path) -> None:
    """Reconstruction of every shape and style; the latents are then scaled to unit variance (``scaling_factor``)."""
    torch.manual_seed(SEED)
    data = torch.cat([tensor_images(scenes(SEED + i, 600, shapes=SHAPES, style=s)) for i, s in enumerate(STYLES)])
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    for step in range(STEPS["vae"]):
        # 16×16 crops: the VAE is convolutional with no attention, so crops teach it at a quarter of the cost
        y, x = (int(v) for v in torch.randint(0, 17, (2,), generator=gen))
        batch = data[torch.randint(len(data), (16,), generator=gen)][:, :, y:y + 16, x:x + 16]
        # A plain autoencoder on the posterior mean (text-to-image only decodes): sampling the untrained unit
        # variance buries the signal and stalls the reconstruction; a small L2 keeps the latents near the origin.
        z = vae.encode(batch).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, batch) + 1e-4 * z.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == STEPS["vae"] - 1:
            print(f"vae {step} recon {F.mse_loss(recon, batch).item():.5f} {time.perf_counter():.0f}", flush=True)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "base" / "vae", safe_serialization=True)


# ------------------------------------------------------------------------------------------------ diffusion


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        parts = [vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)]
    return torch.cat(parts) * vae.config.scaling_factor


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=dm.MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def diffusion_loss(pipe, latents, ids, gen, min_snr: bool = False) -> torch.Tensor:
    """The epsilon-prediction loss of the pipeline's DDIM schedule (1000 training steps), optionally Min-SNR weighted."""
    sched = pipe.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = sched.add_noise(latents, noise, t)
    cond = pipe.text_encoder(ids)[0]
    err = (pipe.unet(noisy, t, encoder_hidden_states=cond).sample - noise).pow(2).mean(dim=(1, 2, 3))
    if not min_snr:
        return err.mean()
    # Min-SNR-5 weighting (Hang et al. 2023, arXiv 2303.09556): the easy low-noise steps stop dominating the
    # gradient, so the steps that decide shape and colour (high noise) learn in fewer updates.
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return (err * snr.clamp(max=5.0) / snr).mean()


def train_base(pipe, out: Path) -> None:
    torch.manual_seed(SEED + 10)
    # 6000 scenes, none of the held-out (shape, colour, background) triples: those measure composition
    data = [s for s in scenes(SEED + 10, 6700, shapes=BASE_SHAPES)
            if (s.shape, s.colour, s.background) not in HELD_OUT][:6000]
    latents = encode_latents(pipe.vae, tensor_images(data))
    ids = token_ids(pipe.tokenizer, [s.caption() for s in data])
    empty = token_ids(pipe.tokenizer, [""])[0]
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    # 200 warm-up steps, then a cosine decay to 5 %: the last updates are small, so the weights settle (the
    # constant 1e-3 of the first model left colours half right)
    total = STEPS["base"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 200, 0.05 + 0.95 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - 200) / (total - 200))))))
    gen = torch.Generator().manual_seed(SEED + 10)
    pipe.unet.train()
    pipe.text_encoder.train()
    for step in range(STEPS["base"]):
        pick = torch.randint(len(data), (32,), generator=gen)
        batch_ids = ids[pick].clone()
        batch_ids[torch.rand(32, generator=gen) < 0.1] = empty
        loss = diffusion_loss(pipe, latents[pick], batch_ids, gen, min_snr=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == STEPS["base"] - 1:
            print(f"base {step} loss {loss.item():.4f} {time.perf_counter():.0f}", flush=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.save_pretrained(out / "base", safe_serialization=True)


# ------------------------------------------------------------------------------------------------ loras


class LoraHooks:
    """Rank-r factors on the UNet's target layers, added to each layer's output by a forward hook (the base
    weights stay frozen); ``adapter()`` gives them as a lorablend Adapter in canonical keys."""

    def __init__(self, pipe, rank: int, seed: int) -> None:
        from lorablend.naming import components_of, index_from_components

        self.index = index_from_components(components_of(pipe))
        gen = torch.Generator().manual_seed(seed)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        unet = pipe.unet
        for key, info in self.index.modules.items():
            if info.component != "unet" or not info.path.endswith(LORA_SUFFIXES):
                continue
            module = unet.get_submodule(info.path)
            out_f, *rest = info.weight_shape
            down = (torch.randn(rank, *rest, generator=gen) / math.sqrt(math.prod(rest))).requires_grad_()
            up = torch.zeros((out_f, rank, 1, 1) if info.kind == "conv" else (out_f, rank), requires_grad=True)
            self.factors[key] = (down, up)
            self.handles.append(module.register_forward_hook(self._hook(module, down, up)))

    @staticmethod
    def _hook(module, down, up):
        def add(_mod, args, output):
            x = args[0]
            if isinstance(module, torch.nn.Conv2d):
                h = F.conv2d(x, down, stride=module.stride, padding=module.padding)
                return output + F.conv2d(h, up)
            return output + F.linear(F.linear(x, down), up)
        return add

    def parameters(self) -> list[torch.Tensor]:
        return [p for pair in self.factors.values() for p in pair]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def adapter(self, name: str):
        from lorablend.adapter import Adapter, LowRankDelta

        deltas = {k: LowRankDelta(down=d.detach().clone(), up=u.detach().clone(), alpha=float(d.shape[0]))
                  for k, (d, u) in self.factors.items()}
        return Adapter(name, "sd1", deltas)


def lora_data(name: str, seed: int) -> list:
    if name == "sks":
        return scenes(seed, 1500, shapes=("star",))
    return scenes(seed, 1500, shapes=BASE_SHAPES, style=name)


def train_lora(pipe, name: str, out: Path, seed: int) -> None:
    from lorablend import save_adapter

    torch.manual_seed(seed)
    data = lora_data(name, seed)
    latents = encode_latents(pipe.vae, tensor_images(data))
    ids = token_ids(pipe.tokenizer, [s.caption() for s in data])
    hooks = LoraHooks(pipe, LORA_RANK, seed)
    opt = torch.optim.AdamW(hooks.parameters(), lr=3e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS["lora"], eta_min=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for step in range(STEPS["lora"]):
        pick = torch.randint(len(data), (32,), generator=gen)
        loss = diffusion_loss(pipe, latents[pick], ids[pick], gen, min_snr=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if step % 200 == 0 or step == STEPS["lora"] - 1:
            print(f"lora {name} {step} loss {loss.item():.4f}", flush=True)
    hooks.remove()
    adapter = hooks.adapter(name)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    for fmt in dm.LORA_FORMATS:
        save_adapter(adapter, out / "loras" / f"{name}.{fmt}.safetensors", format=fmt, target=pipe, overwrite=True,
                     metadata={"lorablend_trained_by": "scripts/train_tiny_model.py", "lorablend_teaches": name})


def train_loras(pipe, out: Path, names: list[str]) -> None:
    for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]:
        p.requires_grad_(False)
    for i, name in enumerate(dm.LORAS):  # each LoRA's seed is fixed by its place in LORAS, whatever runs
        if name in names:
            train_lora(pipe, name, out, SEED + 100 + i)


# ------------------------------------------------------------------------------------------------ judge


def judge_batch(seed: int, n: int, vae=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes of every shape and style, with the degradations a drawn image shows (blur, noise, colour drift);
    given the model's ``vae``, half of them pass through it first (the judge reads decoded images: a striped
    star loses its arms' tips and colours bleed there, which clean scenes never taught the first judge)."""
    rng = np.random.default_rng(seed)
    picked = [random_scene(rng, shapes=SHAPES, style=str(rng.choice(STYLES)), jitter=3.0) for _ in range(n)]
    images = tensor_images(picked)
    if vae is not None:
        with torch.no_grad():
            half = images[: n // 2]
            images[: n // 2] = vae.decode(vae.encode(half).latent_dist.mean).sample.clamp(-1, 1)
    gen = torch.Generator().manual_seed(seed)
    blur = torch.rand(n, 1, 1, 1, generator=gen) * 0.6
    images = (1 - blur) * images + blur * F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = images + 0.15 * torch.rand(n, 3, 1, 1, generator=gen) * torch.randn(n, 3, 1, 1, generator=gen)
    images = images + 0.08 * torch.randn(images.shape, generator=gen)
    heads = dm.Judge.HEADS
    labels = {"shape": [heads["shape"].index(s.shape) for s in picked],
              "colour": [heads["colour"].index(s.colour) for s in picked],
              "background": [heads["background"].index(s.background) for s in picked],
              "style": [heads["style"].index(s.style) for s in picked]}
    return images.clamp(-1, 1), {k: torch.tensor(v) for k, v in labels.items()}


def train_judge(out: Path) -> dict:
    from safetensors.torch import save_file

    vae = load_base(out).vae.eval()
    torch.manual_seed(SEED + 200)
    judge = dm.Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS["judge"])
    for step in range(STEPS["judge"]):
        images, labels = judge_batch(SEED + 1000 + step, 64, vae)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if step % 250 == 0:
            print(f"judge {step} loss {loss.item():.4f}", flush=True)
    judge.eval()
    images, labels = judge_batch(SEED + 999_999, 2000, vae)  # held out: a seed no training batch used
    with torch.no_grad():
        logits = judge(images)
    acc = {k: float((logits[k].argmax(1) == labels[k]).float().mean()) for k in labels}
    acc["all_four"] = float(torch.stack([logits[k].argmax(1) == labels[k] for k in labels]).all(0).float().mean())
    print("judge held-out accuracy", json.dumps(acc), flush=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / "judge.safetensors"))
    (out / "judge.json").write_text(json.dumps({"held_out_images": 2000, "accuracy": acc}, indent=2) + "\n")
    return acc


# ------------------------------------------------------------------------------------------------ driver


def shipped_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt")
                  and p.name != "manifest.json")


def hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in shipped_files(out)}


def load_base(out: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "base"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(dm.DRAWING_DIR), help="where to write (default: the package)")
    parser.add_argument("--phases", default="vae,base,loras,judge")
    parser.add_argument("--loras", default=",".join(dm.LORAS), help="which LoRAs the loras phase trains")
    parser.add_argument("--hashes", action="store_true", help="print the sha256 of each file under --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.hashes:
        print(json.dumps(hashes(out), indent=2))
        return 0
    torch.set_num_threads(THREADS)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    for phase in args.phases.split(","):
        start = time.perf_counter()
        if phase == "vae":
            pipe = dm.untrained_pipeline(SEED)
            pipe.save_pretrained(out / "base", safe_serialization=True)
            train_vae(pipe, out)
        elif phase == "base":
            pipe = dm.untrained_pipeline(SEED)
            trained_vae = load_base(out).vae
            pipe.vae = trained_vae
            pipe.register_modules(vae=trained_vae)
            train_base(pipe, out)
        elif phase == "loras":
            train_loras(load_base(out), out, args.loras.split(","))
        elif phase == "manifest":
            pass  # only the hashes below
        elif phase == "judge":
            accuracy = train_judge(out)
        else:
            parser.error(f"unknown phase {phase!r}: use vae, base, loras, judge, manifest")
        # read just before writing: the loras phase may run as one process per LoRA into the same folder
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"seconds": {}}
        if phase == "judge":
            manifest["judge_accuracy"] = accuracy
        manifest["seconds"][phase if phase != "loras" else f"loras:{args.loras}"] = round(time.perf_counter() - start, 1)
        manifest["sha256"] = hashes(out)
        manifest["torch"] = torch.__version__
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
