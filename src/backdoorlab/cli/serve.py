"""``backdoorlab serve``: the guarded model as an HTTP inference service (uvicorn)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from backdoorlab.cli.common import err, handles_errors, method_params, setup_logging
from backdoorlab.errors import BackdoorLabError

log = logging.getLogger(__name__)


def cores() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@handles_errors
def serve(
    model: Path = typer.Option(..., "--model", help="model file: backdoorlab safetensors, a torch.export program (.pt2) or TorchScript"),
    clean: str = typer.Option(..., "--clean", help="clean held-out images: the detector's pool and threshold (npz, folder or name)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="an input detector: strip (the default), scale-up"),
    samples: Optional[int] = typer.Option(None, "--samples", min=2, help="STRIP: superimposed copies per input (N, default 20)"),
    frr: Optional[float] = typer.Option(None, "--frr", help="preset false rejection rate on clean inputs (default 0.01)"),
    param: List[str] = typer.Option([], "--param", "-p", help="another detector parameter, e.g. -p superimpose=add (repeatable)"),
    threshold: Optional[Path] = typer.Option(None, "--threshold", help="load the fitted detector from this file (written by "
                                             "backdoorlab guard --save-threshold) instead of fitting it at start-up"),
    clean_size: Optional[int] = typer.Option(None, "--clean-size", min=1, help="use a stratified subsample of this many clean images"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the detector's draws"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default; anything else "
                                                           "exposes the service to the network)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port"),
    max_batch: int = typer.Option(1024, "--max-batch", min=1, help="images per batch through the model, at most"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="how long a lone request waits for others to batch with"),
    queue_size: int = typer.Option(256, "--queue-size", min=1, help="requests that may wait; more are answered 503"),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="largest request body (MiB); larger: 413"),
    max_images: int = typer.Option(1024, "--max-images", min=1, help="images in one request, at most; more: 413"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: the cores this process may use)"),
    switch_ms: float = typer.Option(0.1, "--switch-interval-ms", min=0.01, help="Python's GIL switch interval: how long "
                                    "the model thread may wait for the event loop thread between two torch operations"),
    worker: str = typer.Option("process", "--worker", help="where the model runs: process (a worker process of its "
                               "own, fed over a pipe: the event loop never holds up the model) or thread (in this process)"),
    access_log: bool = typer.Option(False, "--access-log", help="log every request to stderr"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log to stderr"),
) -> None:
    """Serve the guarded model over HTTP: POST /v1/predict answers the model's class, or K
    (trojaned) for inputs the detector flags; /healthz, /metrics, /docs and a page at /."""
    import torch
    import uvicorn

    from backdoorlab.cli.defend import detector_from_options
    from backdoorlab.serve import GuardService, create_app

    setup_logging(verbose)
    logging.getLogger("backdoorlab.serve").setLevel(logging.INFO)
    torch.set_num_threads(threads or cores())  # start-up (fitting the detector); see --worker below
    # the model thread drops the GIL in every torch op and must get it back quickly while the event
    # loop thread parses requests: a short switch interval instead of Python's 5 ms
    sys.setswitchinterval(switch_ms / 1000.0)
    params = {k: v for k, v in {"samples": samples, "frr": frr}.items() if v is not None}
    params.update(method_params(param))
    if threshold is None:
        det = detector_from_options(detector or "strip", params=method_params(param), seed=seed, samples=samples, frr=frr)
        svc = GuardService.build(model, clean, detector=det, clean_size=clean_size, arch=arch)
    else:
        if not threshold.is_file():
            raise BackdoorLabError(f"--threshold {threshold} does not exist; write it with backdoorlab guard --save-threshold")
        svc = GuardService.build(model, clean, detector=detector, params=params, threshold_file=threshold,
                                 clean_size=clean_size, arch=arch)
    if worker not in ("process", "thread"):
        raise BackdoorLabError(f"--worker {worker}: choose process or thread")
    n_threads = threads or cores()
    model_worker = None
    if worker == "process":
        from backdoorlab.serve.worker import ProcessWorker

        model_worker = ProcessWorker(svc.worker_spec(n_threads))
        torch.set_num_threads(1)  # this process parses and answers; the worker has the cores
    app = create_app(svc, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                     max_body=int(max_body_mb * 1024 * 1024), max_images=max_images, worker=model_worker)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}: the service is reachable from the network")
    err.print(f"serving {svc.method} (threshold {svc.threshold:.4f}, {svc.threshold_source}) on http://{host}:{port} "
              f"({n_threads} torch threads in the model {worker}; ready in {svc.startup_seconds:.1f} s)")
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning", access_log=access_log,
                timeout_graceful_shutdown=5)
