"""``lorablend sweep`` on a video pipeline (tiny Wan 2.1, 2 steps, 16×16, Wan's default 81 frames): each cell is the
clip's frames side by side in one PNG (a frame strip), the frames the library makes for that cell's mix and seed."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline
from lorablend.pipeline import DiffusionPipeline
from lorablend.sweep import SweepRunSettings, SweepSettings, run_sweep


def test_a_wan_sweep_writes_frame_strips_of_the_library_frames(tmp_path):
    pipe = tiny_2026_pipeline("wan")
    pipe.save_pretrained(str(tmp_path / "wan"))
    g, sd = torch.Generator().manual_seed(1), {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    save_file(sd, str(tmp_path / "motion.safetensors"))
    spec = SweepSettings(str(tmp_path / "wan"), [(str(tmp_path / "motion.safetensors"), "motion")], [0.0, 1.0],
                         ["a cat"], [3], steps=2, width=16, height=16)
    summary = run_sweep(spec, tmp_path / "out", SweepRunSettings(device="cpu"))
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert summary["made"] == len(lines) == 2

    ours = DiffusionPipeline(pipe)
    ours.load_lora_weights(str(tmp_path / "motion.safetensors"), adapter_name="motion")
    for line in lines:
        strip = np.asarray(Image.open(tmp_path / "out" / line["file"]), dtype=np.float64) / 255
        assert strip.shape == (16, 16 * 81, 3)  # 81 frames of 16 x 16, frame 0 on the left
        ours.set_adapters("motion", line["loras"]["motion"])
        frames = ours(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                      generator=np.random.Generator(np.random.PCG64(3))).frames[0]
        assert np.abs(strip - np.concatenate(list(frames), axis=1)).max() <= 1 / 255 + 1e-6  # one 8-bit level
