"""Shared pieces of the benchmarks: the model, the LoRA files, timing and memory probes.

The model is the real-size UNet of SDXL (or SD1.5) built from the real config with deterministic random
weights, wrapped in a diffusers pipeline whose other parts (text encoders, VAE) are tiny: they are never timed.
Weights are filled from a seeded pool of normal numbers, so that any original weight can be regenerated later
(the restore check compares against regenerated weights instead of holding a second copy of the model).

The LoRA files are written once per (model, seed, rank) into a cache folder and read by both systems:
kohya format (SGM names for SDXL, as sd-scripts writes them, with alpha) and diffusers/PEFT format.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
REALDATA = Path(os.environ.get("LORABLEND_REALDATA", REPO.parent / "shared" / "realdata"))
CONFIGS = REALDATA / "configs"
MODEL_DIRS = {"sdxl": "stable-diffusion-xl-base-1.0", "sd15": "stable-diffusion-v1-5"}
TINY_DIRS = {"sdxl": "diffusers-pipeline-tests-tiny-sdxl", "sd15": "diffusers-pipeline-tests-tiny-sd"}
# The LoRA targets of the issue: every attention Linear of the transformer blocks, plus proj_in / proj_out.
TARGET_SUFFIXES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)
POOL_SIZE = 1 << 22  # 4 M normal numbers; every weight is a scaled window of this pool


# ---------------------------------------------------------------- environment


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("diffusers", "peft", "transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[mod] = "absent"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def quiet_libraries() -> None:
    """Silence diffusers' per-call notices (e.g. 'No LoRA keys associated to CLIPTextModel') in timed loops."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


# ---------------------------------------------------------------- timing and memory


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, repeats: int = 3, warmup: int = 1) -> dict:
    """Median (and all samples) of `repeats` timed calls after `warmup` untimed ones, in seconds."""
    for _ in range(warmup):
        fn()
        sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "samples": samples}


def once(fn: Callable[[], object], device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def once_row(fn: Callable[[], object], device) -> tuple[dict, object]:
    """One timed call as a table row: wall seconds (``median``, ``samples``) and this process's CPU seconds
    (``cpu``: all its threads, page faults included). On a machine shared with other work the wall time of a
    single call carries whatever the scheduler did meanwhile; the CPU time mostly does not."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"median": wall, "samples": [wall], "cpu": cpu}, out


class Memory:
    """Per-phase memory of this process: host RSS now and its high-water mark (ru_maxrss), plus the CUDA
    allocator's current and peak bytes when a GPU is used. ru_maxrss only grows, so a phase's figure is the
    high-water mark reached by the end of that phase."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.phases: list[dict] = []

    @staticmethod
    def rss_gib() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
        except OSError:
            return float("nan")

    def mark(self, phase: str) -> dict:
        row = {
            "phase": phase,
            "rss_gib": self.rss_gib(),
            "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.cuda:
            row["cuda_gib"] = torch.cuda.memory_allocated() / 2**30
            row["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.phases.append(row)
        return row


# ---------------------------------------------------------------- deterministic weights


def _seed_of(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class Pool:
    """A seeded pool of N(0, 1) numbers on a device; `fill(t, key, std)` writes a deterministic window of it."""

    def __init__(self, seed: int, device, size: int = POOL_SIZE) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pool = torch.randn(size, generator=gen, dtype=torch.float32)
        self.size = size
        self.data = torch.cat([pool, pool]).to(device)  # doubled so that any window of `size` is contiguous
        self._buf: torch.Tensor | None = None

    def values(self, key: str, shape, std: float, dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.data.device)
        self.fill(out, key, std)
        return out

    @torch.no_grad()
    def fill(self, t: torch.Tensor, key: str, std: float) -> None:
        flat = t.view(-1)
        n = flat.numel()
        off = _seed_of(key) % self.size
        m = min(n, self.size)
        window = self.data[off : off + m]
        if self._buf is None or self._buf.dtype != t.dtype:
            self._buf = torch.empty(self.size, dtype=t.dtype, device=self.data.device)
        chunk = self._buf[:m]
        chunk.copy_(window).mul_(std)  # a reused buffer: fresh large allocations cost page faults
        for start in range(0, n, chunk.numel()):
            stop = min(n, start + chunk.numel())
            flat[start:stop].copy_(chunk[: stop - start])


def weight_std(shape) -> float:
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return fan_in ** -0.5


def expected_param(pool: Pool, name: str, shape, dtype) -> torch.Tensor:
    """The original value of a UNet parameter, regenerated (same rule as `fill_unet`)."""
    out = torch.empty(shape, dtype=dtype, device=pool.data.device)
    _fill_param(pool, name, out)
    return out


def _fill_param(pool: Pool, name: str, p: torch.Tensor) -> None:
    if p.ndim >= 2:
        pool.fill(p, "unet/" + name, weight_std(p.shape))
    elif name.endswith("weight"):  # norm scales
        p.fill_(1.0)
    else:  # biases and embeddings' 1-D params
        p.zero_()


# ---------------------------------------------------------------- model


def unet_config(model: str) -> dict:
    return json.loads((CONFIGS / MODEL_DIRS[model] / "unet" / "config.json").read_text())


@torch.no_grad()
def build_unet(model: str, device, dtype, seed: int = 0):
    """The real-size UNet of `model` with deterministic weights (meta build, then filled: no random init)."""
    from diffusers import UNet2DConditionModel

    cfg = unet_config(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    unet = unet.to(dtype).to_empty(device=device)  # cast on meta: no full-size fp32 copy on the device
    pool = Pool(seed, device)
    for name, p in unet.named_parameters():
        _fill_param(pool, name, p.data)
    for name, b in unet.named_buffers():  # none expected in this UNet, kept for safety
        if b.is_floating_point():
            b.zero_()
    unet.eval().requires_grad_(False)
    return unet, pool


def build_pipeline(model: str, unet, device, dtype):
    """A diffusers pipeline around the real-size UNet; its text encoders and VAE are the tiny test ones."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tiny = CONFIGS / TINY_DIRS[model]
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(json.loads((tiny / "vae" / "config.json").read_text()))
    sched = EulerDiscreteScheduler.from_config(
        json.loads((CONFIGS / MODEL_DIRS["sdxl"] / "scheduler" / "scheduler_config.json").read_text())
    )
    te1 = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((tiny / "text_encoder" / "config.json").read_text())))
    if model == "sdxl":
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(json.loads((tiny / "text_encoder_2" / "config.json").read_text()))
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=sched
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te1, tokenizer=None, unet=unet, scheduler=sched, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    for comp in (vae, te1) + ((te2,) if model == "sdxl" else ()):
        comp.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return pipe


def unet_inputs(model: str, unet, latent: int, device, dtype, batch: int = 1, seed: int = 1) -> dict:
    """Fixed inputs of one UNet step: a latent of `latent`×`latent` (1024² images give 128), 77 text tokens."""
    cfg = unet.config
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    kw = {
        "sample": rnd(batch, cfg.in_channels, latent, latent),
        "timestep": torch.tensor([500] * batch, device=device),
        "encoder_hidden_states": rnd(batch, 77, cfg.cross_attention_dim),
    }
    if model == "sdxl":
        px = latent * 8
        kw["added_cond_kwargs"] = {
            "text_embeds": rnd(batch, 1280),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device, dtype=dtype),
        }
    return kw


def target_modules(unet) -> list[tuple[str, torch.nn.Module]]:
    """The touched layers: (diffusers module path, module), in model order (722 for SDXL)."""
    out = []
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(TARGET_SUFFIXES):
            if ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")):
                if ".attentions." in name:
                    out.append((name, mod))
    return out


# ---------------------------------------------------------------- LoRA files


def lora_tensors(pool: Pool, name: str, module_path: str, weight_shape, rank: int):
    """(down, up) factors of one layer of one LoRA: ΔW = up @ down · alpha/rank has ‖ΔW‖ of a few % of ‖W‖."""
    out_f, in_f = weight_shape[0], weight_shape[1]
    tail = tuple(weight_shape[2:])
    down = pool.values(f"lora/{name}/{module_path}/down", (rank, in_f) + tail, in_f**-0.5, torch.float32)
    up = pool.values(f"lora/{name}/{module_path}/up", (out_f, rank) + tuple(1 for _ in tail), 0.2 * rank**-0.5,
                     torch.float32)
    return down, up


def write_lora(path: Path, fmt: str, model: str, targets, name: str, rank: int, alpha: float | None,
               dtype=torch.float16) -> Path:
    """Write one seeded LoRA over `targets` [(module path, weight shape)] in `fmt` ('kohya' or 'diffusers')."""
    from safetensors.torch import save_file

    pool = _lora_pool()
    sd: dict[str, torch.Tensor] = {}
    if fmt == "kohya":
        from lorablend.naming import module_index

        idx = module_index(family="sdxl" if model == "sdxl" else "sd1")
    for module_path, shape in targets:
        down, up = lora_tensors(pool, name, module_path, shape, rank)
        if fmt == "kohya":
            key = idx.kohya_name("unet." + module_path)
            sd[f"{key}.lora_down.weight"] = down.to(dtype)
            sd[f"{key}.lora_up.weight"] = up.to(dtype)
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        elif fmt == "diffusers":
            sd[f"unet.{module_path}.lora_A.weight"] = down.to(dtype)
            sd[f"unet.{module_path}.lora_B.weight"] = up.to(dtype)
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}: use 'kohya' or 'diffusers'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)} if fmt == "kohya" else None
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


_LORA_POOL: Pool | None = None


def _lora_pool() -> Pool:
    global _LORA_POOL
    if _LORA_POOL is None:
        _LORA_POOL = Pool(12345, "cpu")
    return _LORA_POOL


def lora_files(cache: Path, model: str, targets, specs: list[tuple[str, str, int, float | None]]) -> dict[str, Path]:
    """Write (once; cached by content spec) the LoRA files named in specs [(name, fmt, rank, alpha)]."""
    tag = hashlib.sha1(json.dumps([model, [(p, list(s)) for p, s in targets]]).encode()).hexdigest()[:10]
    out = {}
    for name, fmt, rank, alpha in specs:
        path = cache / f"{model}-{tag}" / f"{name}-{fmt}-r{rank}-a{alpha}.safetensors"
        if not path.exists():
            write_lora(path, fmt, model, targets, name, rank, alpha)
        out[name] = path
    return out


# ---------------------------------------------------------------- output


def timing_of(res: dict, key: str) -> dict | None:
    """The timing ``key`` of one system's result (``{"median", "cpu"?, "samples"}``), or None."""
    return res.get("times", {}).get(key)


def timing_cell(v: dict | None) -> str:
    """A table cell for one timing: its median, and its CPU time when measured."""
    if v is None:
        return "—"
    return fmt_s(v["median"]) + (f" (cpu {fmt_s(v['cpu'])})" if "cpu" in v else "")


def timing_ratio(a: dict | None, b: dict | None) -> str:
    """``a / b`` of two timings' medians (and of their CPU times when both have one)."""
    if not (a and b):
        return "—"
    text = f"{a['median'] / b['median']:.2f}"
    return text + (f" (cpu {a['cpu'] / b['cpu']:.2f})" if a.get("cpu") and b.get("cpu") else "")


def fmt_s(x: float | None) -> str:
    if x is None or x != x:
        return "—"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
