"""``lorablend serve``'s command line (serve/command.py): what it refuses before loading anything, the real
command serving on loopback with a token, and its import without the serve extra."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from lorablend import DiffusionPipeline
from lorablend.cli import main

from serve_support import GEN, free_port, world  # noqa: F401  (world: the module's fixture)


@pytest.mark.parametrize("argv, says", [
    (["serve"], "needs --model and --lora-dir"),
    (["serve", "--model", "m", "--lora-dir", "no-such-folder"], "--lora-dir no-such-folder: not a folder"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--replicas", "2"], "are for --engine ray"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--port", "x"], "invalid int value"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--denoiser", "flux.safetensors"], "--denoiser flux.safetensors"),
])
def test_bad_serve_command_lines_exit_2_with_one_line_naming_the_flag(argv, says, capsys, tmp_path):
    pytest.importorskip("fastapi")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err


def test_serve_is_listed_with_its_flags():
    from lorablend.cli import build_parser

    out = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--lora-dir", "--demo", "--token", "--quantize", "--denoiser", "--engine", "--max-batch", "--drain-seconds"):
        assert flag in out, flag


def test_the_command_serves_binds_loopback_and_checks_the_token(world, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    env = {**os.environ, "LORABLEND_TOKEN": "cli-token", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorablend", "serve", "--model", str(world.model), "--lora-dir",
                             str(world.loras), "--port", str(port), "--max-batch", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):  # start-up: import and model load; not a timing assertion
            if proc.poll() is not None:
                pytest.fail(f"lorablend serve exited: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/v1/loras").status_code == 401
        r = httpx.post(f"{url}/v1/images", headers={"Authorization": "Bearer cli-token"}, timeout=120,
                       json={"prompt": "x", "loras": {"ink": 1.0}, "seed": 1, **GEN})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_command_binds_loopback_unless_told():
    from lorablend.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--lora-dir", "."])
    assert (args.host, args.port, args.compile) == ("127.0.0.1", 8000, False)


def test_compile_on_a_build_without_it_is_a_clear_usage_error(monkeypatch, capsys, tmp_path):
    pytest.importorskip("fastapi")
    from lorablend.cli import main

    monkeypatch.delattr(DiffusionPipeline, "compile_denoiser", raising=False)
    assert main(["serve", "--model", "m", "--lora-dir", str(tmp_path), "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorablend: error: --compile") and "not available in this build" in err, err


def test_the_command_line_imports_without_the_serve_extra():
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from lorablend.cli import main\n"
            "assert main(['serve', '--help']) == 0\n"
            "assert main(['serve', '--model', 'm', '--lora-dir', '.']) == 2\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'lorablend[serve]'" in done.stderr
