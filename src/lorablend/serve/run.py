"""``lorablend serve``'s start-up: check the settings, load the model (compiled when asked), run uvicorn.

>>> serve("sd15/", ServeSettings(lora_dir="loras/"), host="127.0.0.1", port=8000)     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from .config import ServeSettings
from .errors import CompileUnavailable

logger = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_compile() -> None:
    """Raise :class:`CompileUnavailable` unless this build can compile the denoiser with static LoRA slots.

    >>> check_compile()                                                     # doctest: +SKIP
    """
    from ..pipeline import DiffusionPipeline

    if getattr(DiffusionPipeline, "compile_denoiser", None) is None:
        raise CompileUnavailable(
            "--compile: compiling the denoiser with switchable LoRAs is not available in this build of lorablend "
            "(DiffusionPipeline.compile_denoiser is missing); run without --compile")


def load_model(model: str, *, device: str | None = None, dtype: torch.dtype | None = None,
               compile: bool = False, quantize: str | None = None, denoiser: str | None = None) -> tuple[Any, Any]:
    """The ``lorablend.DiffusionPipeline`` to serve, from a folder or hub id, on ``device`` (CUDA when present),
    and, with ``compile``, the handle of its compiled denoiser (``compile_denoiser()``; else None). ``denoiser``:
    a single-file denoiser (GGUF ``flux1-dev-Q8_0.gguf``, or plain fp8 ``.safetensors``) replacing the model's,
    read with the model's config (``lorablend.quant.convert.load_denoiser_file``).

    >>> pipe, compiled = load_model("sd15/", device="cpu")                  # doctest: +SKIP
    """
    from ..images.generate import load_pipeline

    if compile:
        check_compile()  # before seconds of loading
    pipe, _ = load_pipeline(model, [], device=device, dtype=dtype)
    if denoiser:  # a single file in place of the model's denoiser (its config: the model folder's)
        from pathlib import Path

        from ..quant.convert import load_denoiser_file

        load_denoiser_file(pipe, denoiser, config=model if Path(model).is_dir() else None)
    if quantize:  # the denoiser's linears quantized in place (lorablend.quant.convert: nf4, int8, fp8, gguf-Q8_0 …)
        from ..quant.convert import quantize_pipeline

        quantize_pipeline(pipe, quantize)
    # per_sample: every layer a pair from the start, so the first mixed batch or schedule does not recompile
    return pipe, (pipe.compile_denoiser(per_sample=True) if compile else None)


def serve(model: str, config: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: torch.dtype | None = None, compile: bool = False, log_level: str = "info",
          quantize: str | None = None, denoiser: str | None = None) -> None:
    """Load ``model`` and serve it until interrupted (uvicorn, one process: the pipeline is not shared).

    >>> serve("sd15/", ServeSettings(lora_dir="loras/"), port=8000)          # doctest: +SKIP
    """
    import uvicorn

    from .app import create_app

    config.check()
    if host not in LOOPBACK and config.token is None:
        print(f"lorablend serve: warning: listening on {host} without a token; anyone who reaches this port can "
              "use the server (pass --token or set LORABLEND_TOKEN)", file=sys.stderr)
    pipe, compiled = load_model(model, device=device, dtype=dtype, compile=compile, quantize=quantize,
                                denoiser=denoiser)
    app = create_app(pipe, config, compiled=compiled)
    print(f"lorablend serve: {model} on http://{host}:{port} (LoRAs from {config.lora_dir})", file=sys.stderr)
    server = draining_server(uvicorn.Config(app, host=host, port=port, log_level=log_level),
                             app.state.lorablend.worker, config.drain_seconds)
    server.run()


def draining_server(config: Any, worker: Any, drain_seconds: float) -> Any:
    """A ``uvicorn.Server`` that stops in three steps, each answering every client (never a 500):

    1st Ctrl-C / SIGTERM: stop accepting, refuse new requests (503), let the queued and running ones finish for
    up to ``drain_seconds``, then answer the rest 503 + Retry-After; 2nd: answer them all 503 now (the running
    batch ends after its current step) and exit as soon as the answers are out; 3rd: exit at once (uvicorn's).

    >>> draining_server(uvicorn.Config(app), app.state.lorablend.worker, 10.0).run()   # doctest: +SKIP
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signals += 1
            if self.signals == 1:
                logger.warning("stopping: new requests get 503; queued and running ones have %gs to finish (Ctrl-C "
                               "again: answer them 503 now)", drain_seconds)
                worker.drain(drain_seconds)
                self.should_exit = True
            elif self.signals == 2:
                logger.warning("stopping now: every waiting request answered 503 (Ctrl-C again: exit at once)")
                worker.halt()
            else:
                self.force_exit = True

    return DrainingServer(config)


__all__ = ["check_compile", "draining_server", "load_model", "serve"]
