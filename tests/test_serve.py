"""``backdoorlab serve``: the guarded model over HTTP. Answers in JSON and multipart (PNG, npz),
verdicts equal to ``api.guard`` whatever the batching, every malformed request a 4xx with the
service still answering, 503 on a full queue, the Prometheus text, ``guard --save-threshold``
round trip, the page in headless Chromium."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from test_bench import _chromium  # the report test's way to find Debian's chromium

from backdoorlab.cli import app as cli_app
from backdoorlab.errors import BackdoorLabError
from backdoorlab.serve import GuardService, create_app
from backdoorlab.serve.service import png_bytes
from backdoorlab.types import ImageSet

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note on httpx vs httpx2
    from fastapi.testclient import TestClient

runner = CliRunner()


# ----------------------------------------------------------------------------- a cheap service
@pytest.fixture(scope="module")
def cheap() -> tuple[GuardService, torch.Tensor]:
    """An untrained CNN behind STRIP (N = 6) on 120 random clean images; 40 more random inputs."""
    from backdoorlab.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 10, (1, 28, 28))).eval()
    x = torch.randint(0, 256, (160, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    svc = GuardService.build(model, ImageSet(x[:120], torch.arange(120) % 10, 10, name="clean"), params={"samples": 6})
    return svc, x[120:]


def _npz(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x)
    return buf.getvalue()


def _same(got: list[dict], want: list[dict]) -> bool:
    """The same answers for the same images sent one at a time: prediction, verdict and threshold equal, the
    score to float32 rounding (a batch of 1 and a batch of 5 take different kernels on some CPUs: 7e-7 apart
    under ``ATEN_CPU_CAPABILITY=avx2``)."""
    return len(got) == len(want) and all(
        {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        and g["score"] == pytest.approx(w["score"], abs=1e-5) for g, w in zip(got, want))


def test_predict_json_png_and_npz_agree(cheap):
    svc, x = cheap
    with TestClient(create_app(svc)) as c:
        js = c.post("/v1/predict", json={"images": x[:5, 0].tolist()})
        assert js.status_code == 200
        res = js.json()["results"]
        assert len(res) == 5 and set(res[0]) == {"prediction", "trojaned", "score", "threshold"}
        pred, scores, flagged = svc.guard(x[:5])
        assert [r["prediction"] for r in res] == pred.tolist() and [r["trojaned"] for r in res] == flagged.tolist()
        assert [r["score"] for r in res] == pytest.approx(scores.tolist(), abs=1e-6)
        assert all(r["threshold"] == svc.threshold for r in res)
        npz = c.post("/v1/predict", files={"file": ("x.npz", _npz(x[:5, 0].numpy()))}).json()["results"]
        assert npz == res
        npz_c = c.post("/v1/predict", files={"file": ("x.npz", _npz(x[:5].permute(0, 2, 3, 1).numpy()))}).json()["results"]
        assert npz_c == res  # N x H x W x C as well
        for i in (0, 3):
            png = c.post("/v1/predict", files={"file": ("a.png", png_bytes(x[i].float() / 255))})
            assert png.status_code == 200 and _same(png.json()["results"], [res[i]])
        from PIL import Image

        buf = io.BytesIO()  # an RGB file that holds a grey image is read as grey
        Image.fromarray(np.repeat(x[2, 0].numpy()[..., None], 3, axis=2), mode="RGB").save(buf, format="PNG")
        assert _same(c.post("/v1/predict", files={"file": ("rgb.png", buf.getvalue())}).json()["results"], [res[2]])
        ex = c.post("/v1/explain", files={"file": ("a.png", png_bytes(x[1].float() / 255))}).json()
        assert ex["prediction"] == res[1]["prediction"] and ex["score"] == pytest.approx(res[1]["score"], abs=1e-6)
        assert len(ex["copies"]) == 6 and ex["entropy"] == pytest.approx(-ex["score"])
        assert c.get("/healthz").json()["status"] == "ok"
        info = c.get("/v1/info").json()
        assert info["samples"] == 6 and info["trojaned_class"] == 10 and info["image_shape"] == [1, 28, 28]
        assert "/v1/predict" in c.get("/openapi.json").json()["paths"] and c.get("/docs").status_code == 200


MALFORMED = [  # (content type, body, status, words in the error)
    ("application/json", b"", 422, "empty body"),
    ("application/json", b"{not json", 400, "not valid JSON"),
    ("application/json", b'{"pictures": []}', 422, '{"images"'),
    ("application/json", b'{"images": []}', 422, "empty batch"),
    ("application/json", b'{"images": 7}', 422, "must be a list"),
    ("application/json", b'{"images": [[[1, 2], [3]]]}', 422, "rectangular"),
    ("application/json", json.dumps({"images": np.zeros((2, 20, 20), int).tolist()}).encode(), 422, "20x20 but the model takes 28x28"),
    ("application/json", json.dumps({"images": np.zeros((1, 28, 28, 3), int).tolist()}).encode(), 422, "RGB (3 channels)"),
    ("application/json", json.dumps({"images": np.full((1, 28, 28), 300).tolist()}).encode(), 422, "0..255"),
    ("application/json", json.dumps({"images": np.full((1, 28, 28), 0.5).tolist()}).encode(), 422, "uint8"),
    ("application/json", json.dumps({"images": [[["a"] * 28] * 28]}).encode(), 422, "numbers"),
    ("text/plain", b"hello", 415, "content type text/plain"),
    (None, ("x.png", b"\x89PNG\r\n\x1a\n broken"), 422, "cannot be decoded"),
    (None, ("x.jpg", b"\xff\xd8\xff\xe0 broken jpeg"), 422, "cannot be decoded"),
    (None, ("x.bin", b"GIF89a...."), 415, "not a PNG, JPEG or .npz"),
    (None, ("x.npz", b"PK\x03\x04 not a zip"), 422, ".npz cannot be read"),
    (None, ("x.npz", None), 422, "no key x"),
    (None, ("x.png", None), 422, "10x10 but the model takes 28x28"),
    (None, ("x.npz", b""), 422, "upload is empty"),
]


def _malformed_file(name: str, data: bytes | None) -> bytes:
    if data is not None:
        return data
    if name.endswith(".npz"):
        buf = io.BytesIO()
        np.savez(buf, images=np.zeros((1, 28, 28), np.uint8))
        return buf.getvalue()
    return png_bytes(torch.zeros(1, 10, 10))


def test_every_malformed_request_is_a_4xx_naming_it_and_the_service_goes_on(cheap):
    svc, x = cheap
    good = {"images": x[:1, 0].tolist()}
    with TestClient(create_app(svc, max_body=64_000, max_images=8)) as c:
        for ctype, body, status, words in MALFORMED:
            if ctype is None:
                r = c.post("/v1/predict", files={"file": (body[0], _malformed_file(*body))})
            else:
                r = c.post("/v1/predict", content=body, headers={"content-type": ctype})
            assert r.status_code == status and words in r.json()["error"], (words, r.status_code, r.text)
            assert c.post("/v1/predict", json=good).status_code == 200  # still serving
        r = c.post("/v1/predict", files={"nofile": ("a.png", png_bytes(torch.zeros(1, 28, 28)))})
        assert r.status_code == 422 and "field named 'file'" in r.json()["error"]
        big = json.dumps({"images": x[:40, 0].tolist()}).encode()  # ~70 kB > 64 kB
        r = c.post("/v1/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over the limit of 64000 bytes" in r.json()["error"]
        r = c.post("/v1/predict", files={"file": ("x.npz", _npz(np.zeros((200, 28, 28), np.uint8)))})
        assert r.status_code == 413
        r = c.post("/v1/predict", json={"images": x[:9, 0].tolist()})
        assert r.status_code == 413 and "limit is 8" in r.json()["error"]
        r = c.post("/v1/explain", json={"images": x[:2, 0].tolist()})
        assert r.status_code == 422 and "exactly one image" in r.json()["error"]
        assert c.get("/v1/sample/9999.png").status_code == 422
        r = c.post("/v1/predict", json=good)
        assert r.status_code == 200 and len(r.json()["results"]) == 1
        assert c.get("/healthz").status_code == 200


class _Blocking(GuardService):
    """A service whose batches wait for ``release`` (to fill the queue on purpose)."""

    entered: threading.Event
    release: threading.Event

    def results(self, x):
        self.entered.set()
        assert self.release.wait(30)
        return super().results(x)


def test_a_full_queue_answers_503_with_retry_after(cheap):
    svc, x = cheap
    slow = _Blocking(svc.model, svc.detector, svc.threshold, svc.clean, svc.method, svc.threshold_source)
    slow.entered, slow.release = threading.Event(), threading.Event()
    body = {"images": x[:2, 0].tolist()}
    with TestClient(create_app(slow, queue_size=1, max_batch=1, max_wait_ms=0)) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/predict", json=body)
        assert slow.entered.wait(30)  # the worker holds the first request
        second = pool.submit(c.post, "/v1/predict", json=body)
        for _ in range(300):  # until the second request waits in the queue
            if c.get("/healthz").json()["queue_depth"] == 1:
                break
            time.sleep(0.01)
        full = c.post("/v1/predict", json=body)
        assert full.status_code == 503 and full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]
        slow.release.set()
        assert first.result(30).status_code == 200 and second.result(30).status_code == 200
        assert c.post("/v1/predict", json=body).status_code == 200  # serving again
        assert "backdoorlab_rejected_queue_full_total 1" in c.get("/metrics").text


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*)?\})? (\S+)$')


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """Every sample of a Prometheus text exposition, strictly: (name, labels) -> value."""
    out: dict[tuple[str, str], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or base in types, f"sample without a TYPE: {line!r}"
        out[(m.group(1), m.group(3) or "")] = float(m.group(5))
    return out


def test_metrics_are_prometheus_text_and_count_what_happened(cheap):
    svc, x = cheap
    with TestClient(create_app(svc)) as c:
        for n in (1, 3, 4):
            assert c.post("/v1/predict", json={"images": x[:n, 0].tolist()}).status_code == 200
        assert c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        m = parse_prometheus(r.text)
    assert m[("backdoorlab_requests_total", 'route="/v1/predict",code="200"')] == 3
    assert m[("backdoorlab_requests_total", 'route="/v1/predict",code="400"')] == 1
    assert m[("backdoorlab_inputs_total", "")] == 8
    assert m[("backdoorlab_batch_inputs_count", "")] == 3 and m[("backdoorlab_batch_inputs_sum", "")] == 8
    assert 0.0 <= m[("backdoorlab_flagged_share", "")] <= 1.0
    lat = sorted((float(re.search(r'le="([^"]+)"', k[1]).group(1).replace("+Inf", "inf")), v) for k, v in m.items()
                 if k[0] == "backdoorlab_request_duration_seconds_bucket" and 'route="/v1/predict"' in k[1])
    assert [v for _, v in lat] == sorted(v for _, v in lat) and lat[-1] == (float("inf"), 4)


def test_serve_help_and_bad_threshold_file(tmp_path):
    r = runner.invoke(cli_app, ["serve", "--help"])
    assert r.exit_code == 0 and "127.0.0.1" in r.output and "--threshold" in r.output
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(b"\x80\x04 a pickle, not safetensors")
    np.savez(tmp_path / "c.npz", x=np.zeros((30, 28, 28), np.uint8), y=np.arange(30) % 10)
    from backdoorlab.models import ModelSpec, build_model, save_model

    save_model(build_model(ModelSpec("cnn", 10, (1, 28, 28))), tmp_path / "m.safetensors")
    r = runner.invoke(cli_app, ["serve", "--model", str(tmp_path / "m.safetensors"), "--clean", str(tmp_path / "c.npz"),
                                "--threshold", str(bad)])
    assert r.exit_code == 2 and "not a backdoorlab detector file" in r.output


# ----------------------------------------------------------------------------- on the BadNets victim
@pytest.fixture(scope="module")
def victim():
    from _backdoored import victim as build

    return build()


@pytest.mark.slow
def test_verdicts_equal_api_guard_whatever_the_batching(victim):
    from backdoorlab import api

    x = torch.cat([victim.test.x[:150], victim.triggered.x[:50]])
    clean = victim.holdout.subset(torch.arange(600))
    rep = api.guard(victim.model, clean, x, samples=20)
    assert int(rep.flagged[150:].sum()) >= 45 and int(rep.flagged[:150].sum()) <= 10  # a real detector, not all-or-none
    svc = GuardService.build(victim.model, clean, params={"samples": 20})
    assert svc.threshold == rep.detection.threshold
    for max_batch, per in ((1, 1), (7, 3), (256, 5), (64, 200)):
        with TestClient(create_app(svc, max_batch=max_batch, max_wait_ms=20)) as c, ThreadPoolExecutor(12) as pool:
            chunks = [x[i:i + per] for i in range(0, len(x), per)]
            # shuffled arrival: each request's answer must still be its own, in its order
            order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(max_batch)).tolist()
            futs = {i: pool.submit(c.post, "/v1/predict", json={"images": chunks[i][:, 0].tolist()}) for i in order}
            res = [r for i in range(len(chunks)) for r in futs[i].result().json()["results"]]
            batches = parse_prometheus(c.get("/metrics").text)[("backdoorlab_batch_inputs_count", "")]
        assert len(res) == len(x)
        assert [r["trojaned"] for r in res] == rep.flagged.tolist(), (max_batch, per)
        assert [r["prediction"] for r in res] == rep.predictions.tolist(), (max_batch, per)
        assert torch.allclose(torch.tensor([r["score"] for r in res]), rep.scores, atol=1e-5)
        if max_batch == 1:
            assert batches == len(x)  # one image per batch
        if max_batch == 256:
            assert batches < len(chunks)  # concurrent requests shared batches


@pytest.mark.slow
def test_save_threshold_round_trip(victim, tmp_path, monkeypatch):
    from backdoorlab.api.defend import load_detector
    from backdoorlab.models import save_model

    save_model(victim.model, tmp_path / "m.safetensors")
    hold = victim.holdout.subset(torch.arange(400))
    np.savez(tmp_path / "clean.npz", x=hold.x[:, 0].numpy(), y=hold.y.numpy())
    inputs = torch.cat([victim.test.x[:60], victim.triggered.x[:20]])
    np.savez(tmp_path / "in.npz", x=inputs[:, 0].numpy())
    t = tmp_path / "thr.safetensors"
    r = runner.invoke(cli_app, ["guard", "--model", str(tmp_path / "m.safetensors"), "--clean", str(tmp_path / "clean.npz"),
                                "--inputs", str(tmp_path / "in.npz"), "--samples", "10", "--save-threshold", str(t), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["written"]["threshold"] == str(t) and out["num_flagged"] >= 18
    head = t.read_bytes()
    n = int.from_bytes(head[:8], "little")
    meta = json.loads(json.loads(head[8:8 + n])["__metadata__"]["backdoorlab"])  # plain safetensors + JSON
    assert meta["method"] == "strip" and meta["params"]["samples"] == 10 and meta["threshold"] == out["threshold"]
    assert not list(tmp_path.glob(".thr.safetensors.*"))  # nothing half-written left
    from backdoorlab.defenses import Strip

    def no_fit(*a, **k):
        raise AssertionError("the saved detector was fitted again")

    monkeypatch.setattr(Strip, "fit", no_fit)  # restored from the file, the clean set is not scored again
    svc = GuardService.build(tmp_path / "m.safetensors", tmp_path / "clean.npz", threshold_file=t)
    monkeypatch.undo()
    assert svc.threshold == out["threshold"] and svc.threshold_source == "file thr.safetensors"
    pred, scores, flagged = svc.guard(inputs)
    assert flagged.tolist() == out["flagged"] and pred.tolist() == out["predictions"]
    assert scores.tolist() == pytest.approx(out["scores"], abs=1e-5)
    # the same service with the model in a worker process fed over a pipe: the same answers; a
    # worker killed mid-service is started again on the next batch; one that cannot start says why
    import dataclasses
    import os
    import signal

    from backdoorlab.serve.worker import ProcessWorker, WorkerFailed

    spec = svc.worker_spec(1)
    worker = ProcessWorker(spec)
    with TestClient(create_app(svc, worker=worker, max_wait_ms=0)) as c:
        res = c.post("/v1/predict", json={"images": inputs[:, 0].tolist()}).json()["results"]
        assert [r["trojaned"] for r in res] == out["flagged"] and [r["prediction"] for r in res] == out["predictions"]
        assert [r["score"] for r in res] == pytest.approx(out["scores"], abs=1e-5)
        assert c.get("/v1/info").json()["worker"] == "process" and worker.info["threshold"] == svc.threshold
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        assert c.get("/healthz").json()["worker_process"] == "restarting on the next batch"
        again = c.post("/v1/predict", json={"images": inputs[:7, 0].tolist()})
        assert again.status_code == 200 and again.json()["results"] == res[:7]
        assert c.get("/healthz").json()["worker_starts"] == 2
    assert worker.proc is None  # stopped with the application
    with pytest.raises(WorkerFailed, match="could not build"):
        ProcessWorker(dataclasses.replace(spec, model=str(tmp_path / "missing.safetensors"))).start()
    with pytest.raises(BackdoorLabError, match="other clean images"):
        load_detector(t, model=victim.model, clean=hold.subset(torch.arange(300)))
    from backdoorlab.models import ModelSpec, build_model

    with pytest.raises(BackdoorLabError, match="another model"):
        load_detector(t, model=build_model(ModelSpec("cnn", 10, (1, 28, 28))), clean=hold)
    with pytest.raises(BackdoorLabError, match="differs from the threshold file"):
        GuardService.build(victim.model, hold, threshold_file=t, params={"samples": 20})
    r = runner.invoke(cli_app, ["guard", "--model", str(tmp_path / "m.safetensors"), "--clean", str(tmp_path / "clean.npz"),
                                "--inputs", str(tmp_path / "in.npz"), "--method", "nosuch"])
    assert r.exit_code == 2 and "nosuch" in r.output
    r = runner.invoke(cli_app, ["guard", "--model", str(tmp_path / "m.safetensors"), "--clean", str(tmp_path / "clean.npz"),
                                "--inputs", str(tmp_path / "in.npz"), "--save-threshold", str(tmp_path / "t.pkl")])
    assert r.exit_code == 2 and ".safetensors" in r.output and not (tmp_path / "t.pkl").exists()


@pytest.mark.slow
def test_scale_up_detector_behind_the_service(victim, tmp_path):
    """Any registered input detector serves: SCALE-UP (another family member, no restore hook: the
    saved file keeps its threshold and the detector is fitted again)."""
    from backdoorlab import api
    from backdoorlab.api.defend import load_detector, save_detector
    from backdoorlab.defenses import DEFENSES

    if "scale-up" not in DEFENSES:
        pytest.skip("the scale-up detector is not in this tree")
    clean = victim.holdout.subset(torch.arange(300))
    x = torch.cat([victim.test.x[:40], victim.triggered.x[:40]])
    rep = api.guard(victim.model, clean, x, method="scale-up")
    svc = GuardService.build(victim.model, clean, detector="scale-up")
    assert svc.method == "scale-up" and svc.threshold == rep.detection.threshold
    with TestClient(create_app(svc)) as c:
        res = c.post("/v1/predict", json={"images": x[:, 0].tolist()}).json()["results"]
    assert [r["trojaned"] for r in res] == rep.flagged.tolist()
    assert [r["prediction"] for r in res] == rep.predictions.tolist()
    assert [r["score"] for r in res] == pytest.approx(rep.scores.tolist(), abs=1e-6)
    save_detector(rep.detector, tmp_path / "s.safetensors", model=victim.model, clean=clean, method="scale-up")
    det, thr, meta = load_detector(tmp_path / "s.safetensors", model=victim.model, clean=clean)
    assert meta["method"] == "scale-up" and thr == rep.detection.threshold and det.fitted


# ----------------------------------------------------------------------------- the page, in a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium); CI installs it")
def test_page_shows_the_answer_entropy_and_copies_in_headless_chromium(cheap, tmp_path):
    svc, _ = cheap
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    with uvicorn_in_thread(create_app(svc)) as url:
        page = f"{url}/?sample=5"
        dom = subprocess.run(base + ["--dump-dom", page], capture_output=True, timeout=120, text=True).stdout
        shot = tmp_path / "shot.png"
        p = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1000,900", page], capture_output=True, timeout=120)
    assert 'data-done="1"' in dom, dom[-2000:]
    expect = svc.results(svc.clean.x[5:6])[0]
    assert f'data-prediction="{expect["prediction"]}"' in dom
    assert dom.count('class="px copy"') == 6 and "threshold" in dom and "entropy" in dom
    assert shot.is_file(), p.stderr[-500:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert img.size == (1000, 900) and hi - lo > 100
