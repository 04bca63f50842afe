"""Chaos on a real ``lorablend serve`` process (tiny SD1.5, loopback): random bad requests, a client that leaves
mid-generation, SIGKILL + restart, Ctrl-C twice with requests queued. Every answer is a documented one (never a
500, never an unbounded echo), a left generation stops between steps, uploads survive the restart with the same
image bytes, a second Ctrl-C answers every waiting client 503 + Retry-After and the process exits, and the log
holds one line per event (no traceback).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import GEN, TOKEN, free_port, wait_until, world  # noqa: E402

__all__ = ["world"]  # the fixture, imported for pytest to find
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG = {"steps": 200, "width": 64, "height": 64}  # a generation that runs long enough to leave or stop


class Server:
    """``python -m lorablend serve`` in a subprocess; its stderr collected."""

    def __init__(self, world, uploads: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "lorablend", "serve", "--model", str(world.model), "--lora-dir",
                str(world.loras), "--port", str(self.port), "--token", TOKEN, "--device", "cpu", "--upload-dir",
                str(uploads), "--drain-seconds", "60", "--max-steps", "200", "--max-queue", "8",
                "--max-upload-bytes", "3000000", "--max-body-bytes", "100000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(self._up, "the server to start", 300)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail("the server exited during start-up:\n" + "\n".join(self.lines[-30:]))
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=300)

    def progress(self) -> dict:
        return httpx.get(f"{self.url}/sdapi/v1/progress?skip_current_image=true", headers=AUTH, timeout=30).json()


def _bad_requests(rng: random.Random) -> list[tuple[str, str, dict, set[int]]]:
    """(method, path, httpx kwargs, the documented answers) for a seeded random set of bad requests."""
    junk = [10**30, 1e308, "20", [], True, "x" * 5000, [1] * 500]  # each invalid for every field below
    image_fields = ["steps", "width", "height", "seed", "guidance_scale", "num_images", "scale", "loras", "prompt"]
    cases = []
    for _ in range(24):
        body = {"prompt": "x", **{f: rng.choice(junk) for f in rng.sample(image_fields, rng.randint(1, 3))}}
        cases.append(("POST", "/v1/images", {"json": body}, {422}))
    cases += [
        ("POST", "/v1/images", {"content": b'{"prompt": "x", "steps": NaN'}, {422}),
        ("POST", "/v1/images", {"json": {"prompt": "x", "loras": {"nope": 1.0}, **GEN}}, {404}),
        ("POST", "/v1/images", {"json": {"prompt": "x", "width": 2048, "height": 2048, "steps": 2}}, {422}),
        ("POST", "/v1/images", {"json": {"prompt": "x" * 200_000}}, {413}),
        ("POST", "/v1/images", {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, {401}),
        ("POST", "/v1/loras", {"json": {"path": "../../etc/passwd"}}, {403}),
        ("POST", "/v1/loras", {"json": {"path": "missing.safetensors"}}, {404}),
        ("POST", "/v1/loras", {"json": {"path": "x" * 50_000}}, {422}),
        ("POST", "/v1/loras", {"json": {"path": ["x"] * 30_000}}, {413}),
        ("POST", "/v1/loras", {"files": {"file": ("junk.safetensors", b"\x00" * 100)}}, {422}),
        ("DELETE", "/v1/loras/nope", {}, {404}),
        ("DELETE", "/v1/loras/ink", {}, {409}),
        ("PUT", "/v1/images", {"json": {}}, {405}),
        ("GET", "/no/such/route", {}, {404}),
        ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "<lora:ink:abc>"}}, {422}),
        ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "steps": 10**6}}, {422}),
        ("POST", "/sdapi/v1/img2img", {"json": {"prompt": "x", "init_images": ["%%% not base64"]}}, {422}),
        ("POST", "/sdapi/v1/img2img", {"json": {"prompt": "x", "init_images": ["R0lGODlh"]}}, {422}),
        ("POST", "/v1/images", {"json": {"prompt": "x", "loras": {"ink": {"high": 1.0, "low": 0.3}}}}, {422}),
        ("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "another model"}}, {422}),
        ("POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "99999x1"}}, {422}),
    ]
    rng.shuffle(cases)
    return cases


def _raw_long_request(port: int) -> socket.socket:
    data = json.dumps({"prompt": "leaving", "seed": 1, **LONG}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def _ask_in_thread(server: Server, answers: list, body: dict) -> threading.Thread:
    def ask() -> None:
        try:
            with server.client() as client:
                answers.append(client.post("/v1/images", json=body))
        except httpx.HTTPError as exc:  # the connection dropped (a SIGKILLed server answers nothing)
            answers.append(exc)
    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_chaos_every_answer_is_documented(world, tmp_path):
    uploads = tmp_path / "uploads"
    server = Server(world, uploads)
    try:
        with server.client() as client:
            for method, path, kwargs, expected in _bad_requests(random.Random(20)):
                r = client.request(method, path, **kwargs)
                assert r.status_code in expected, (method, path, r.status_code, r.text[:300])
                assert len(r.content) < 8_000, (path, "an error body must quote a bounded excerpt")
                assert "detail" in r.json()
            # a client that leaves mid-generation: its batch stops between steps
            sock = _raw_long_request(server.port)
            wait_until(lambda: server.progress()["state"]["sampling_step"] >= 1, "the long request to run")
            sock.close()
            wait_until(lambda: _metric(server, "lorablend_batches_cancelled_total") == 1, "the batch cancelled")
            assert server.progress()["state"]["job_count"] == 0
            # an upload with a unicode name, and an image made with it
            up = client.post("/v1/loras", files={"file": ("моё.safetensors", world.files["ink"].read_bytes())})
            assert up.status_code == 201 and up.json()["name"] == "моё", up.text
            first = client.post("/v1/images", json={"prompt": "kept", "loras": {"моё": 0.7}, "seed": 3, **GEN})
            assert first.status_code == 200
            assert "500" not in _statuses(client)
        answers: list = []
        thread = _ask_in_thread(server, answers, {"prompt": "killed", "seed": 2, **LONG})
        wait_until(lambda: server.progress()["state"]["sampling_step"] >= 1, "the request to run")
        server.proc.send_signal(signal.SIGKILL)
        thread.join()
        assert isinstance(answers[0], httpx.HTTPError)  # documented: a killed server answers nothing
        server.proc.wait()
        # restart: the upload is served again, the same request gives the same bytes
        server = Server(world, uploads)
        with server.client() as client:
            again = client.post("/v1/images", json={"prompt": "kept", "loras": {"моё": 0.7}, "seed": 3, **GEN})
            assert again.status_code == 200 and again.content == first.content
        _ctrl_c_twice(server)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    log = "\n".join(server.lines)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def _statuses(client: httpx.Client) -> set[str]:
    text = client.get("/metrics").text
    return {line.split('status="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("lorablend_requests_total{")}


def _ctrl_c_twice(server: Server) -> None:
    """Three long requests waiting (one running); Ctrl-C drains (60 s), a 2nd answers them all 503 at once."""
    answers: list = []
    threads = [_ask_in_thread(server, answers, {"prompt": f"queued {i}", "seed": i, **LONG}) for i in range(3)]
    wait_until(lambda: server.progress()["state"]["job_count"] == 3, "three requests waiting")
    server.proc.send_signal(signal.SIGINT)
    wait_until(lambda: any("stopping:" in line for line in server.lines), "the first Ctrl-C logged")
    server.proc.send_signal(signal.SIGINT)
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [503] * 3, [getattr(a, "text", a) for a in answers]
    assert all(a.headers["retry-after"] and "send the request again" in a.json()["detail"] for a in answers)
    assert server.proc.wait(timeout=60) == 0
    assert sum("stopping" in line for line in server.lines) == 2  # one line per Ctrl-C
