"""The FastAPI application of ``backdoorlab serve``.

Routes: ``POST /v1/predict`` (JSON ``{"images": [...]}`` or a multipart upload in the field
``file``: PNG, JPEG or .npz with ``x``), ``POST /v1/explain`` (one image: the answer and the
superimposed copies, PNG base64), ``GET /v1/sample/{i}.png`` (a clean held-out image),
``GET /v1/info``, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``/docs`` (OpenAPI) and the
page at ``/``. Every error is JSON ``{"error": "..."}`` with a 4xx status (503 + Retry-After when
the queue is full); a body over ``max_body`` bytes is refused (413) before it is read whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from backdoorlab.errors import BackdoorLabError
from backdoorlab.serve.batcher import Batcher, QueueFull
from backdoorlab.serve.decode import RequestError, decode_file, decode_json
from backdoorlab.serve.metrics import Metrics
from backdoorlab.serve.service import GuardService
from backdoorlab.serve.worker import ProcessWorker, WorkerFailed

log = logging.getLogger(__name__)

_IMAGES_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "description": "N x H x W or N x H x W x C nested uint8 lists",
                                      "items": {"type": "array"}}}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "a PNG or JPEG image, or an .npz with x (N,H,W[,C]) uint8"}}}},
    },
}
_ANSWER = {"200": {"description": "one result per input, in order", "content": {"application/json": {"example": {
    "results": [{"prediction": 3, "trojaned": False, "score": -1.52, "threshold": -0.41}]}}}}}


class _BodyTooLarge(Exception):
    pass


class Guardrails:
    """ASGI middleware: refuse bodies over ``max_body`` bytes (413, from Content-Length or while
    streaming) and record every request's route, status and latency in the metrics."""

    def __init__(self, app: Any, max_body: int, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        path = scope.get("path", "")

        async def sending(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"], status["started"] = msg["status"], True
            await send(msg)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise _BodyTooLarge()
            seen = 0

            async def receiving() -> dict:
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge()
                return msg

            await self.app(scope, receiving, sending)
        except _BodyTooLarge:
            if not status["started"]:
                await _send_json(sending, 413, {"error": f"the request body is over the limit of {self.max_body} bytes; "
                                                         "send fewer or smaller images per request"})
        finally:
            self.metrics.request(path, status["code"], time.perf_counter() - t0)


async def _send_json(send: Any, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(service: GuardService, *, max_batch: int = 1024, max_wait_ms: float = 5.0, queue_size: int = 256,
               max_body: int = 16 * 1024 * 1024, max_images: int = 1024, retry_after: int = 1,
               worker: ProcessWorker | None = None) -> Any:
    """The ASGI application serving ``service``. ``queue_size`` requests may wait; more get 503.
    With ``worker`` the batches run in that model worker process (started with the application),
    else in a thread of this process."""
    metrics = Metrics()
    run_batch = service.results if worker is None else (lambda x: service.answers(*worker.guard(x)))
    batcher = Batcher(run_batch, max_batch=max_batch, max_wait=max_wait_ms / 1000.0, queue_size=queue_size,
                      metrics=metrics, flagged=lambda answers: sum(a["trojaned"] for a in answers),
                      in_flight=1 if worker is None else worker.in_flight)
    explaining = asyncio.Semaphore(4)
    shape = service.image_shape

    @asynccontextmanager
    async def lifespan(app: Any):
        if worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, worker.start)
            if worker.info.get("threshold") != service.threshold:
                worker.close()
                raise WorkerFailed(f"the model worker's threshold {worker.info.get('threshold')} differs from the "
                                   f"server's {service.threshold}")
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            if worker is not None:
                worker.close()

    app = FastAPI(title="backdoorlab guarded model", lifespan=lifespan, version="1",
                  description="The model's class for clean inputs; class K (trojaned) for inputs the detector flags "
                              f"({service.method}, threshold {service.threshold:.4f}).")
    app.state.service, app.state.batcher, app.state.metrics = service, batcher, metrics

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(WorkerFailed)
    async def _worker_failed(request: Request, exc: WorkerFailed) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(retry_after)})

    @app.exception_handler(BackdoorLabError)
    async def _bad_input(request: Request, exc: BackdoorLabError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    async def images_of(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return decode_json(await request.body(), shape, max_images)
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=max_body)
            except _BodyTooLarge:
                raise
            except Exception as exc:  # noqa: BLE001 - python-multipart's errors vary; all are the client's
                raise RequestError(400, f"the multipart body cannot be parsed ({exc})") from None
            up = form.get("file")
            if up is None or isinstance(up, str):
                raise RequestError(422, "the multipart body has no file field named 'file'; upload the image as file=@...")
            data = await up.read()
            await form.close()
            return decode_file(data, shape, max_images, name=f"file {up.filename or ''}".strip())
        raise RequestError(415, f"content type {ctype or '(none)'} is not accepted; send application/json "
                                '{"images": [...]} or multipart/form-data with a file field')

    @app.post("/v1/predict", openapi_extra={"requestBody": _IMAGES_BODY}, responses=_ANSWER,
              summary="Guarded predictions for one or many images")
    async def predict(request: Request) -> JSONResponse:
        x = await images_of(request)
        try:
            results = await batcher.submit(x)
        except QueueFull:
            raise RequestError(503, f"the queue is full ({batcher.queue_size} requests waiting); retry after "
                                    f"{retry_after} s", {"Retry-After": str(retry_after)}) from None
        return JSONResponse({"results": results})

    @app.post("/v1/explain", openapi_extra={"requestBody": _IMAGES_BODY},
              summary="One image: the answer, the entropy against the threshold and the superimposed copies (PNG base64)")
    async def explain(request: Request) -> JSONResponse:
        x = await images_of(request)
        if x.shape[0] != 1:
            raise RequestError(422, f"explain takes exactly one image; got {x.shape[0]}: use /v1/predict for batches")
        if explaining.locked():
            raise RequestError(503, "too many explanations at once; retry", {"Retry-After": str(retry_after)})
        async with explaining:
            return JSONResponse(await batcher.run(service.explain, x))

    @app.get("/v1/sample/{index}.png", summary="A clean held-out image as PNG (to try the page)")
    async def sample(index: int) -> Response:
        return Response(service.sample_png(index), media_type="image/png")

    @app.get("/v1/info", summary="The model, the detector and its threshold")
    async def info() -> dict:
        return {**service.info(), "worker": "process" if worker is not None else "thread", "max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue_size": queue_size,
                "max_body": max_body, "max_images": max_images}

    @app.get("/healthz", summary="200 while the model worker runs")
    async def healthz() -> JSONResponse:
        ok = batcher.alive
        body: dict[str, Any] = {"status": "ok" if ok else "worker stopped", "queue_depth": batcher.depth}
        if worker is not None:
            body.update(worker_process="running" if worker.alive else "restarting on the next batch",
                        worker_starts=worker.starts)
        return JSONResponse(body,
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    async def prometheus() -> PlainTextResponse:
        metrics.queue_depth = batcher.depth
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("backdoorlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(Guardrails, max_body=max_body, metrics=metrics)
    return app
