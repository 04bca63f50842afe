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
