"""serve/run.py: the server's start-up — the compile check before any loading, the model loaded as a
lorablend.DiffusionPipeline (uvicorn itself runs in tests/serve/test_serve.py)."""

from __future__ import annotations

import pytest
import torch

from lorablend import DiffusionPipeline
from lorablend.serve.errors import CompileUnavailable
from lorablend.serve.run import check_compile, load_model


def test_a_saved_pipeline_loads_as_the_pipeline_to_serve(make_pipe, tmp_path):
    base = make_pipe("sd1")
    base.save_pretrained(tmp_path / "model")
    pipe, compiled = load_model(str(tmp_path / "model"), device="cpu")
    assert isinstance(pipe, DiffusionPipeline) and compiled is None
    ref = dict(base.unet.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in pipe.unet.named_parameters())


def test_compile_is_checked_before_loading(monkeypatch):
    check_compile()  # this build has DiffusionPipeline.compile_denoiser
    monkeypatch.delattr(DiffusionPipeline, "compile_denoiser")
    with pytest.raises(CompileUnavailable, match="run without --compile"):
        load_model("no/such-model", compile=True)


def test_a_single_gguf_denoiser_file_replaces_the_models(tmp_path):
    """``load_model(folder, denoiser="flux-Q8_0.gguf")`` (``serve --denoiser``): the saved pipeline's denoiser is
    the GGUF file's, read with the folder's own config; its linears are GGUF layers LoRAs load onto."""
    pytest.importorskip("gguf")
    from quant_support import write_gguf_file

    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline
    from lorablend.quant.formats import format_of

    base = tiny_flux_pipeline()
    base.save_pretrained(tmp_path / "model")
    write_gguf_file(tmp_path / "flux-Q8_0.gguf", base.transformer.state_dict(), "Q8_0")
    pipe, _ = load_model(str(tmp_path / "model"), device="cpu", denoiser=str(tmp_path / "flux-Q8_0.gguf"))
    labels = {format_of(m).label(m) for m in pipe.denoiser.modules() if format_of(m) is not None}
    assert labels == {"gguf-Q8_0"}
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load_model(str(tmp_path / "model"), device="cpu", denoiser=str(tmp_path / "model" / "model_index.json"))
