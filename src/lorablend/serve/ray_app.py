"""``lorablend serve --engine ray``: the same HTTP API as Ray Serve replicas, each holding one pipeline, its
adapter cache and its own ``create_app`` (the very app of ``--engine local``), with requests routed by LoRA mix.

Two deployments. ``lorablend`` (the router, no model) takes every HTTP request from Ray Serve's proxy, reads the
LoRA mix of a generation request (the same request models the app uses: ``loras`` and ``<lora:name:weight>``
tokens), names it by the sorted mix (``mix_id``) and passes the raw request to ``lorablend-pipeline`` with
``multiplexed_model_id=mix_id``: Ray Serve sends it to a replica that already holds that mix when one does. Each
pipeline replica answers it through its own ``create_app`` in-process (ASGI), so paths, bodies, answers, the token
check and the limits are those of the one-process server. Other requests (health, listings, metrics) go to any
replica. Ray is imported only when ``deploy`` runs.

What differs from one process: registering a path (``POST /v1/loras`` JSON) would change one replica only, so it
is refused (501): put LoRA files in ``--lora-dir``, which every replica reads (on a cluster: a folder every node
sees at the same path). Uploads (multipart ``POST /v1/loras``) and ``DELETE /v1/loras/{name}`` reach every replica
when the server has a shared ``--upload-dir`` (refused without one). ``/metrics`` sums every replica's counters,
histograms and gauges (:func:`metrics.merge_texts`): each replica leaves its text with one small named actor
(``lorablend-metrics``) after every answer, the router adds them up. ``--compile`` compiles each replica's denoiser.

>>> deploy("sd15/", ServeSettings(lora_dir="loras/"), RayServeSettings(replicas=2))      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from .config import ServeSettings

GENERATION_ROUTES = {"/v1/images": "ImageRequest", "/sdapi/v1/txt2img": "Txt2ImgRequest",
                     "/sdapi/v1/img2img": "Img2ImgRequest", "/v1/images/generations": "OpenAIImageRequest"}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


def _ray_gone() -> tuple[type, ...]:
    """Ray's errors for a replica that died under a request (empty without Ray: nothing to catch)."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:
        return ()
    return (ActorDiedError, ActorUnavailableError, RayActorError)



def mix_id(path: str, body: bytes, config: ServeSettings) -> str:
    """The multiplexed model id of a request: its sorted LoRA mix as JSON (``""`` for any other request, or a
    body the app will refuse anyway: that answer comes from any replica).

    >>> mix_id("/v1/images", b'{"prompt": "a cat <lora:ink:0.5>", "loras": {"paper": 1}}', ServeSettings("."))
    '[["ink", 0.5], ["paper", 1.0]]'
    >>> mix_id("/v1/images", b'{"prompt": "a cat"}', ServeSettings("."))
    '[]'
    """
    from . import schemas

    model = GENERATION_ROUTES.get(path.rstrip("/"))
    if model is None:
        return ""
    try:
        gen = getattr(schemas, model).model_validate_json(body).generation(config)
    except Exception:  # a 422 (or worse) is the replica's to answer, in the app's own words
        return ""
    return json.dumps(sorted((name, float(w)) for name, w in gen.loras.items()))


class PipelineReplica:
    """One Ray Serve replica: the pipeline, and ``create_app`` over it, answering requests passed by the router.

    >>> replica = PipelineReplica("sd15/", {"lora_dir": "loras/"}, "cpu", None)          # doctest: +SKIP
    """

    def __init__(self, model: str, config: dict[str, Any], device: str | None, dtype: str | None,
                 compile: bool = False) -> None:
        import httpx

        from ..io.write import parse_dtype
        from .app import create_app
        from .run import load_model

        self.config = ServeSettings(**config).check()
        self.pipe, compiled = load_model(model, device=device, dtype=parse_dtype(dtype) if dtype else None,
                                         compile=compile)
        self.app = create_app(self.pipe, self.config, compiled=compiled)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                        timeout=None)
        self.pid = os.getpid()

    async def hold(self, model_id: str) -> str:
        """Ray Serve's multiplexed loader: parse this mix's LoRAs into the cache now (the worker loads them into
        the pipeline at the switch). Wrapped by ``serve.multiplexed`` in :func:`deploy`."""
        from fastapi.concurrency import run_in_threadpool

        names = [name for name, _ in json.loads(model_id)] if model_id else []
        try:
            await run_in_threadpool(self.app.state.lorablend.adapters_for, names)
        except Exception:  # an unknown or damaged LoRA: the request's own answer (404 / 422) says so
            pass
        return model_id

    async def handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple:
        """Answer one HTTP request through this replica's app: ``(status, headers, body)``.

        >>> await replica.handle("GET", "/health", [], b"")                       # doctest: +SKIP
        (200, [('content-type', 'application/json')], b'{"status":"ok"}')
        """
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.hold(model_id)
        response = await self.client.request(method, path, headers=headers, content=body)
        await metrics_hub().put.remote(self.pid, self.app.state.lorablend.metrics.render())  # before the answer
        kept = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS]
        return response.status_code, kept + [("x-lorablend-replica", str(self.pid))], response.content

    def __del__(self) -> None:
        state = getattr(getattr(self, "app", None), "state", None)
        if state is not None:
            state.lorablend.close()  # stop the worker thread, remove the uploads folder


class MetricsHub:
    r"""Each replica's latest ``/metrics`` text, by process id (a Ray actor: see :func:`metrics_hub`).

    >>> hub = MetricsHub(); hub.put(1, "x 1\n"); hub.snapshot()
    {1: 'x 1\n'}
    """

    def __init__(self) -> None:
        self.by_replica: dict[int, str] = {}

    def put(self, pid: int, text: str) -> None:
        self.by_replica[pid] = text

    def snapshot(self) -> dict[int, str]:
        return dict(self.by_replica)


def metrics_hub() -> Any:
    """The one ``MetricsHub`` actor of this Ray namespace, made by whoever asks first (detached: it outlives the
    replica that made it, so a replaced replica's counts are still summed).

    >>> metrics_hub().snapshot.remote()                                         # doctest: +SKIP
    """
    import ray

    return ray.remote(MetricsHub).options(name="lorablend-metrics", get_if_exists=True, lifetime="detached",
                                          num_cpus=0).remote()


class Router:
    """The HTTP ingress: reads the mix, passes the request to a pipeline replica (see the module).

    >>> Router(pipeline_handle, {"lora_dir": "loras/"})                                # doctest: +SKIP
    """

    def __init__(self, pipeline: Any, config: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.config = ServeSettings(**config)

    def shared(self, request: Any) -> bool:
        """Whether a LoRA change reaches every replica: an upload (multipart) or a DELETE, with --upload-dir set —
        a folder every replica reads (on a cluster: the same path on every node); each replica serves what is
        there by name (its catalog reads the folder again when a name is unknown or gone)."""
        if self.config.upload_dir is None:
            return False
        return request.method == "DELETE" or request.headers.get("content-type", "").startswith("multipart/")

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        path = request.url.path
        if path.rstrip("/").startswith("/v1/loras") and request.method in ("POST", "DELETE") and not self.shared(
                request):
            return JSONResponse({"detail": f"{request.method} {path}: registering a path at run time changes one "
                                           "replica only, so a Ray server refuses it; put the file in --lora-dir "
                                           "(every replica reads it), or upload it (multipart) to a server started "
                                           "with a shared --upload-dir, and ask again"}, status_code=501)
        body = await request.body()
        model_id = mix_id(path, body, self.config) if request.method == "POST" else ""
        handle = self.pipeline.options(multiplexed_model_id=model_id) if model_id else self.pipeline
        target = path + (f"?{request.url.query}" if request.url.query else "")
        try:
            status, headers, content = await handle.handle.remote(request.method, target,
                                                                   list(request.headers.items()), body)
            if path.rstrip("/") == "/metrics" and request.method == "GET" and status == 200:
                content = await self._all_metrics(content, dict(headers).get("x-lorablend-replica"))
        except Exception as exc:
            if not isinstance(exc, _ray_gone()):
                raise
            # the replica died with this request on it; Ray Serve starts another in its place
            return JSONResponse({"detail": f"the replica running this request stopped ({type(exc).__name__}); "
                                           "no image was made: send the request again"}, status_code=503)
        return Response(content, status_code=status, headers=dict(headers))

    @staticmethod
    async def _all_metrics(answered: bytes, pid: str | None) -> bytes:
        """The replica's fresh text summed with every other replica's latest (the hub's)."""
        from .metrics import merge_texts

        latest = await metrics_hub().snapshot.remote()
        others = [text for replica, text in latest.items() if str(replica) != pid]  # (its own: fresher here)
        return merge_texts([answered.decode()] + others).encode()


@dataclass
class RayServeSettings:
    """How the server runs on Ray: ``replicas`` pipelines of ``gpus_per_replica`` GPUs (and ``cpus_per_replica``
    CPUs) each; ``address`` joins a running cluster (``None``: a local Ray instance started here);
    ``mixes_per_replica``: mixes a replica is known to hold (Ray Serve's multiplexing LRU; the adapter cache's
    own bound, ``--cache-bytes``, decides what stays parsed).

    >>> RayServeSettings(replicas=2).mixes_per_replica
    16
    """

    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    address: str | None = None
    mixes_per_replica: int = 16
    device: str | None = None
    dtype: str | None = None
    compile: bool = False  # each replica's denoiser under torch.compile (serve --compile)

    def check(self) -> "RayServeSettings":
        """Raise ``ValueError`` naming the bad setting. >>> RayServeSettings(replicas=0).check()
        Traceback (most recent call last):
        ...
        ValueError: --replicas 0: must be at least 1
        """
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: must be at least 1")
        if self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica {self.gpus_per_replica}: must be 0 or more, e.g. 1")
        return self


def build_app(model: str, config: ServeSettings, options: RayServeSettings) -> Any:
    """The Ray Serve application (router + pipeline replicas), ready for ``serve.run``.

    >>> serve.run(build_app("sd15/", ServeSettings(lora_dir="loras/"), RayServeSettings(replicas=2)))  # doctest: +SKIP
    """
    from ray import serve

    options.check()
    replica_cls = type("PipelineReplica", (PipelineReplica,), {
        "hold": serve.multiplexed(max_num_models_per_replica=options.mixes_per_replica)(PipelineReplica.hold)})
    pipeline = serve.deployment(replica_cls, name="lorablend-pipeline", num_replicas=options.replicas,
                                ray_actor_options={"num_cpus": options.cpus_per_replica,
                                                   "num_gpus": options.gpus_per_replica})
    router = serve.deployment(Router, name="lorablend", num_replicas=1, ray_actor_options={"num_cpus": 0})
    settings = asdict(config)
    settings["lora_dir"] = os.path.abspath(settings["lora_dir"])  # replicas may start in another folder
    if settings.get("upload_dir") is not None:
        settings["upload_dir"] = os.path.abspath(settings["upload_dir"])
    model = os.path.abspath(model) if os.path.exists(model) else model
    return router.bind(pipeline.bind(model, settings, options.device, options.dtype, options.compile), settings)


def deploy(model: str, config: ServeSettings, options: RayServeSettings, *, host: str = "127.0.0.1",
           port: int = 8000, blocking: bool = True) -> Any:
    """Connect to Ray (``options.address``, or a local instance), start Ray Serve's HTTP proxy on ``host:port``
    and run the app; with ``blocking`` until interrupted, else return the router's handle.

    >>> deploy("sd15/", ServeSettings(lora_dir="loras/"), RayServeSettings(replicas=2), port=8000)   # doctest: +SKIP
    """
    import ray
    from ray import serve

    config.check()
    options.check()
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(model, config, options), name="lorablend", route_prefix="/", blocking=blocking)


__all__ = ["GENERATION_ROUTES", "PipelineReplica", "RayServeSettings", "Router", "build_app", "deploy", "mix_id"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'RayServeOptions': 'RayServeSettings'}, globals())
