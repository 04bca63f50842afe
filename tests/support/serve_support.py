"""What the serve tests share (no tests here): a tiny SD1.5 pipeline saved to a folder, LoRA files written by
lorablend's writer, a real uvicorn server on a free loopback port in a thread, and the library's own images
to compare with (a second pipeline from the same folder, LoRAs loaded the plain way).
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lorablend import DiffusionPipeline
from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline
from lorablend.io import save_adapter

TOKEN = "test-token"
GEN = {"steps": 2, "width": 32, "height": 32, "guidance_scale": 7.5}  # fast: 2 steps, 32x32 images
LORAS = {"ink": dict(seed=1), "paper": dict(seed=2, targets="attn"), "moss": dict(seed=3, rank=8),
         "clay": dict(seed=4, rank=2)}
# One 8-bit level: a PNG from the server against the library's float image (rounding is half a level; batched
# and unbatched runs differ by ~1e-6).
LEVEL = 1.0 / 255


@dataclass
class World:
    """Files on disk: the model folder, the LoRA folder, and a folder outside it (for escape attempts)."""

    root: Path
    model: Path
    loras: Path
    outside: Path
    files: dict[str, Path] = field(default_factory=dict)


def make_world(root: Path) -> World:
    """Save the tiny SD1.5 pipeline and four LoRA files (kohya and diffusers format)."""
    pipe = tiny_pipeline("sd1")
    world = World(root, root / "model", root / "loras", root / "outside")
    pipe.save_pretrained(world.model)
    world.loras.mkdir()
    world.outside.mkdir()
    for i, (name, kw) in enumerate(LORAS.items()):
        path = world.loras / f"{name}.safetensors"
        save_adapter(random_adapter(pipe, name, strength=2.0, **kw), path, format="kohya" if i % 2 == 0 else
                     "diffusers", target=pipe)
        world.files[name] = path
    return world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """uvicorn serving ``create_app`` in a thread, on 127.0.0.1; ``client()`` talks to it with the token."""

    def __init__(self, world: World, *, compile_backend: str | None = None, **config: Any) -> None:
        import uvicorn

        from lorablend.serve import ServeSettings, create_app

        self.pipe = DiffusionPipeline.from_pretrained(str(world.model))
        self.pipe.set_progress_bar_config(disable=True)
        self.config = ServeSettings(lora_dir=world.loras, token=TOKEN, **config)
        compiled = self.pipe.compile_denoiser(backend=compile_backend) if compile_backend else None
        self.app = create_app(self.pipe, self.config, compiled=compiled)
        self.state = self.app.state.lorablend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:  # start-up, not a timing assertion
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            time.sleep(0.02)

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


class Library:
    """The library's images for the same folder and files: what every server image must equal."""

    def __init__(self, world: World) -> None:
        self.pipe = DiffusionPipeline.from_pretrained(str(world.model))
        self.pipe.set_progress_bar_config(disable=True)
        for name, path in world.files.items():
            self.pipe.load_lora_weights(str(path), adapter_name=name)

    def image(self, prompt: str, mix: dict[str, float], seed: int, *, num_images: int = 1, scale: float = 1.0,
              negative_prompt: str | None = None, **kw: Any) -> np.ndarray:
        settings = {**GEN, **kw}
        self.pipe.set_adapters(list(mix), [float(w) for w in mix.values()])
        out = self.pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=settings["steps"],
                        width=settings["width"], height=settings["height"], guidance_scale=settings["guidance_scale"],
                        num_images_per_prompt=num_images, output_type="np",
                        cross_attention_kwargs={"scale": scale} if scale != 1.0 else None,
                        generator=np.random.Generator(np.random.PCG64(seed)))
        return out.images


def wait_until(predicate, what: str, limit_s: float = 120.0) -> None:
    """Wait for a state the test set up (a request queued, a client dropped); a guard against hanging, never a
    timing assertion: the limit is far above any run."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {limit_s:.0f} s for {what}")
        time.sleep(0.01)


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def decode_b64(text: str) -> np.ndarray:
    return decode_png(base64.b64decode(text))


def assert_same_image(got: np.ndarray, expected: np.ndarray, what: str = "", levels: float = 1.0) -> None:
    worst = float(np.abs(np.asarray(got, np.float32) - np.asarray(expected, np.float32)).max())
    assert worst <= levels * LEVEL + 1e-6, f"{what}: differs by {worst * 255:.2f} levels of 255"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def library(world) -> Library:
    return Library(world)


@pytest.fixture(scope="module")
def server(world):
    running = RunningServer(world, max_batch=4, max_upload_bytes=1_500_000)
    yield running
    running.stop()
