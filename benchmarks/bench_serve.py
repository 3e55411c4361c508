"""``backdoorlab serve`` under load, against ``backdoorlab guard`` offline on the same model and inputs.

Victim: full MNIST, BadNets 3x3 patch all-to-one -> 0, 10% poisoned, small CNN 5 epochs, seed 0
(``_victims.py``; cached). Clean held-out set: the victim's 3,000 held-out images. Inputs: the
first ``--clean-inputs`` clean test images and ``--triggered-inputs`` triggered ones, each distinct.
STRIP with N = ``--samples`` (20).

1. Offline: ``backdoorlab guard --json --save-threshold`` on all inputs (a subprocess): inputs/s
   (screening only, as the command reports it) and every input's verdict, the reference.
2. The server: ``backdoorlab serve --threshold`` (the saved detector) as a subprocess on a free
   loopback port; the time until ``/healthz`` answers.
3. Closed loop: one asyncio httpx client, ``--connections`` (64) connections, ``--images`` images
   per request (consecutive distinct inputs), for ``--duration`` s. Throughput vs offline (bar
   >= 0.8), 5xx count (bar 0), every answer checked against its request's offline verdicts (count,
   order, prediction, flag; bar: no mismatch), latency percentiles and Little's law
   (connections x images / throughput vs the mean latency).
4. Open loop: Poisson arrivals of 4-image requests at half the offline inputs/s for
   ``--poisson-duration`` s: latency percentiles (bar p99 <= 250 ms).
5. The closed loop again with 10% malformed requests (every kind the service refuses), for
   ``--malformed-duration`` s: every malformed one a 4xx, every good one its answer; the server's
   VmRSS at the start and the end of the phase (bar: flat).
6. Kill: ``SIGKILL`` the server mid-load, check nothing changed on disk (the folder's files and
   their hashes), restart it, time until ``/healthz`` answers (bar <= 10 s), and check its answers.

The server (torch threads = the cores) and the client (one asyncio process) share the machine's
cores: that is the measurement. Loopback only; every loop is bounded in count and time.

    BACKDOORLAB_DATA=/path/to/shared/data python benchmarks/bench_serve.py [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import header, need_shared
from _victims import victim

import httpx  # noqa: E402 - after _common (allocator tuning)

OK, CLIENT_ERR = "ok", "client-error"
# uvicorn closes a keep-alive connection idle for 5 s (timeout_keep_alive); a client reusing one
# idle for about that long races the close, as any HTTP client pool does: keep a safety margin
KEEP_ALIVE_REUSE = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads) so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The server's child processes (the model worker)."""
    out: list[int] = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return out


def worker_cpu_seconds(pid: int) -> float:
    total = 0.0
    for c in children(pid):
        try:
            total += cpu_seconds(c)
        except OSError:
            pass
    return total


def own_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q)) if a else float("nan")


def start_server(args, files: dict[str, Path], port: int) -> tuple[subprocess.Popen, float]:
    """Spawn ``backdoorlab serve`` and wait for /healthz; returns (process, seconds until healthy)."""
    cmd = ["backdoorlab", "serve","--model", str(files["model"]), "--clean", str(files["clean"]), "--threshold", str(files["threshold"]),
            "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
            "--queue-size", str(args.queue_size), "--max-body-mb", str(args.max_body_mb), *args.server_arg]
    t0 = time.perf_counter()
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.server_env))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(files["dir"] / "server.log", "ab"),
                            cwd=files["dir"], env=env)
    deadline = t0 + 60
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {files['dir'] / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not answer /healthz within 60 s")


# ----------------------------------------------------------------------------- requests
class Requests:
    """Good requests (``k`` consecutive distinct inputs, JSON) with their expected answers, and malformed ones."""

    def __init__(self, x: np.ndarray, ref: dict, k: int) -> None:
        self.x, self.ref, self.k = x, ref, k
        self.bodies = [json.dumps({"images": x[s:s + k].tolist()}).encode() for s in range(0, len(x) - k + 1, k)]
        self.next = 0

    def good(self) -> tuple[bytes, int]:
        i = self.next % len(self.bodies)
        self.next += 1
        return self.bodies[i], i * self.k

    def check(self, start: int, results: list[dict]) -> bool:
        """The answer is this request's: as many results as images, each the offline verdict of its input."""
        if len(results) != self.k:
            return False
        for j, r in enumerate(results):
            i = start + j
            if r["prediction"] != self.ref["predictions"][i] or r["trojaned"] != self.ref["flagged"][i]:
                return False
            if abs(r["score"] - self.ref["scores"][i]) > 1e-4:
                return False
        return True


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field ``file``."""
    b = "backdoorlabboundary"
    body = (f'--{b}\r\ncontent-disposition: form-data; name="file"; filename="{name}"\r\n'
            f"content-type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def malformed_requests(shape: tuple[int, int], max_body: int) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) for every kind of bad input the service must refuse with a 4xx."""
    h, w = shape
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((h + 3, w, 3), np.uint8)).save(png, format="PNG")
    nokey = io.BytesIO()
    np.savez(nokey, images=np.zeros((1, h, w), np.uint8))
    j = "application/json"
    return [
        ("invalid JSON", b'{"images": [[[1, 2', j),
        ("empty batch", b'{"images": []}', j),
        ("wrong size", json.dumps({"images": np.zeros((2, h - 4, w), int).tolist()}).encode(), j),
        ("wrong channels", json.dumps({"images": np.zeros((1, h, w, 3), int).tolist()}).encode(), j),
        ("out of range", json.dumps({"images": np.full((1, h, w), 999).tolist()}).encode(), j),
        ("ragged", b'{"images": [[[1, 2], [3]]]}', j),
        ("undecodable PNG", *multipart("x.png", b"\x89PNG\r\n\x1a\n" + os.urandom(64))),
        ("wrong-size RGB PNG", *multipart("x.png", png.getvalue())),
        ("npz without x", *multipart("x.npz", nokey.getvalue())),
        ("unknown content type", b"hello", "text/plain"),
        ("body over the limit", b" " * (max_body + 1), j),
    ]


# ----------------------------------------------------------------------------- a light HTTP/1.1 client
class Conn:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load client's own, far lighter on
    the shared cores than a general client (httpx spends ~1 ms of CPU per request)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        try:
            self.writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {ctype}\r\n"
                              f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            hdr = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            data = await self.reader.readexactly(int(hdr.get("content-length", "0")))
            if hdr.get("connection", "").lower() == "close":
                self.close()
            return status, data
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            raise ConnectionError("connection lost") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# ----------------------------------------------------------------------------- load
async def closed_loop(port: int, reqs: Requests, connections: int, duration: float, *, malformed_share: float = 0.0,
                      bad: list | None = None) -> dict:
    """``connections`` workers, each sending its next request as soon as the last is answered."""
    st = {"good": 0, "inputs": 0, "lat": [], "mismatch": 0, "5xx": 0, "other": {}, "bad": 0,
          "bad_4xx": 0, "bad_wrong": {}, "conn_errors": 0}
    rng = random.Random(0)
    t_end = time.perf_counter() + duration

    async def worker() -> None:
        conn = Conn(port)
        while time.perf_counter() < t_end:
            if bad and rng.random() < malformed_share:
                kind, body, ctype = bad[rng.randrange(len(bad))]
                st["bad"] += 1
                try:
                    code, data = await conn.post("/v1/predict", body, ctype)
                except ConnectionError:
                    st["conn_errors"] += 1
                    continue
                if 400 <= code < 500 and "error" in json.loads(data):
                    st["bad_4xx"] += 1
                else:
                    st["bad_wrong"][kind] = code
                continue
            body, start = reqs.good()
            t0 = time.perf_counter()
            try:
                code, data = await conn.post("/v1/predict", body)
            except ConnectionError:
                st["conn_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            dt = time.perf_counter() - t0
            if code == 200:
                st["good"] += 1
                st["inputs"] += reqs.k
                st["lat"].append(dt)
                if not reqs.check(start, json.loads(data)["results"]):
                    st["mismatch"] += 1
            elif code >= 500:
                st["5xx"] += 1
            else:
                st["other"][code] = st["other"].get(code, 0) + 1
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    st["seconds"] = time.perf_counter() - t0
    return st


async def open_loop(port: int, reqs: Requests, rate: float, duration: float, max_in_flight: int = 512,
                    reuse_idle: float = KEEP_ALIVE_REUSE) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``duration`` s (bounded in count and in flight);
    each request on an idle keep-alive connection from a pool (a new one when none is idle)."""
    st = {"sent": 0, "lat": [], "mismatch": 0, "errors": 0, "shed": 0, "codes": {}, "stale_dropped": 0}
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    idle: list[tuple[Conn, float]] = []  # (connection, when it was last answered)
    in_flight = 0

    async def one(body: bytes, start: int, t_sched: float) -> None:
        nonlocal in_flight
        conn = None
        while idle and conn is None:
            conn, since = idle.pop()
            if time.perf_counter() - since > reuse_idle:  # the server may be closing it right now
                st["stale_dropped"] += 1
                conn.close()
                conn = None
        reused = conn is not None
        conn = conn or Conn(port)
        try:
            code, data = await conn.post("/v1/predict", body)
            dt = time.perf_counter() - t_sched  # from the scheduled arrival: no coordinated omission
            if code == 200:
                st["lat"].append(dt)
                if not reqs.check(start, json.loads(data)["results"]):
                    st["mismatch"] += 1
            else:
                st["errors"] += 1
                st["codes"][code] = st["codes"].get(code, 0) + 1
            idle.append((conn, time.perf_counter()))
        except ConnectionError:
            st["errors"] += 1
            kind = "connection (reused)" if reused else "connection (new)"
            st["codes"][kind] = st["codes"].get(kind, 0) + 1
        finally:
            in_flight -= 1

    t0 = time.perf_counter()
    tasks = []
    for a in arrivals:
        delay = t0 + a - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= max_in_flight:
            st["shed"] += 1
            continue
        in_flight += 1
        body, start = reqs.good()
        st["sent"] += 1
        tasks.append(asyncio.create_task(one(body, start, t0 + a)))
    await asyncio.gather(*tasks)
    st["seconds"] = time.perf_counter() - t0
    for c, _ in idle:
        c.close()
    return st


def folder_state(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name != "server.log"}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="closed-loop load, seconds")
    ap.add_argument("--poisson-duration", type=float, default=30.0)
    ap.add_argument("--malformed-duration", type=float, default=30.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--images", type=int, default=8, help="images per request in the closed loops")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--clean-inputs", type=int, default=4000)
    ap.add_argument("--triggered-inputs", type=int, default=1000)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--max-body-mb", type=float, default=1.0, help="the server's body limit (the over-limit malformed "
                    "request is just over it)")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server's environment (repeatable)")
    ap.add_argument("--server-arg", action="append", default=[], help="another option of backdoorlab serve (repeatable)")
    ap.add_argument("--reuse-idle-s", type=float, default=KEEP_ALIVE_REUSE, help="open loop: reuse a keep-alive "
                    "connection idle at most this long (the server closes them after 5 s)")
    ap.add_argument("--offline-runs", type=int, default=3, help="runs of the offline guard; the fastest is the baseline")
    ap.add_argument("--closed-only", action="store_true", help="stop after the closed loop (quick comparisons)")
    args = ap.parse_args()
    need_shared()
    header("backdoorlab serve under load vs backdoorlab guard offline")
    v = victim("mnist", "patch")
    print(f"   victim: {v.describe()}")
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"   cpu: {cpu}, {os.cpu_count()} cores (server and client share them)")

    from backdoorlab.models import save_model

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    files = {"dir": work, "model": work / "model.safetensors", "clean": work / "clean.npz",
             "inputs": work / "inputs.npz", "threshold": work / "threshold.safetensors"}
    save_model(v.model, files["model"])
    hold = v.splits.holdout
    np.savez(files["clean"], x=hold.x[:, 0].numpy(), y=hold.y.numpy())
    xin = torch.cat([v.splits.test.x[:args.clean_inputs], v.triggered.x[:args.triggered_inputs]])[:, 0].numpy()
    n_in = len(xin)
    np.savez(files["inputs"], x=xin)

    # 1. offline
    cmd = ["backdoorlab", "guard", "--model", str(files["model"]), "--clean", str(files["clean"]), "--inputs",
           str(files["inputs"]), "--samples", str(args.samples), "--save-threshold", str(files["threshold"]), "--json"]
    runs = []
    for _ in range(args.offline_runs):
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(p.stdout))
    ref = runs[0]
    assert all(r["flagged"] == ref["flagged"] and r["predictions"] == ref["predictions"] for r in runs)
    offline = max(r["inputs_per_second"] for r in runs)  # the strictest baseline of the runs
    each = ", ".join(f"{r['inputs_per_second']:.0f}" for r in runs)
    print(f"\n1. offline: backdoorlab guard on {n_in} inputs ({args.clean_inputs} clean + {args.triggered_inputs} "
          f"triggered), N={args.samples}, {len(hold)} clean held-out, {args.offline_runs} runs ({each} inputs/s): "
          f"{offline:.0f} inputs/s, the fastest, is the baseline; flagged "
          f"{sum(ref['flagged'][:args.clean_inputs])} clean, {sum(ref['flagged'][args.clean_inputs:])} triggered; "
          f"threshold {ref['threshold']:.4f}")

    # 2. the server
    port = free_port()
    server, up = start_server(args, files, port)
    print(f"\n2. server up (pid {server.pid}) in {up:.2f} s, /healthz answered")
    results: dict = {"offline_inputs_per_s": offline}
    try:
        reqs = Requests(xin, ref, args.images)
        asyncio.run(closed_loop(port, reqs, args.connections, 3.0))  # warm-up
        reqs.next = 0
        rss0 = rss_kib(server.pid)

        # 3. closed loop
        s0, w0, c0 = cpu_seconds(server.pid), worker_cpu_seconds(server.pid), own_cpu_seconds()
        st = asyncio.run(closed_loop(port, reqs, args.connections, args.duration))
        s_cpu, c_cpu = (cpu_seconds(server.pid) - s0) / st["seconds"], (own_cpu_seconds() - c0) / st["seconds"]
        w_cpu = (worker_cpu_seconds(server.pid) - w0) / st["seconds"]
        thr = max(st["inputs"], 1) / st["seconds"]
        lat = st["lat"]
        little = args.connections * args.images / thr
        print(f"\n3. closed loop: {args.connections} connections x {args.images} images/request, {st['seconds']:.1f} s: "
              f"{st['good']} requests, {st['inputs']} inputs, {thr:.0f} inputs/s = {thr / offline:.3f} x offline "
              f"(bar >= 0.8); 5xx {st['5xx']}; other non-200 {st['other']}; connection errors {st['conn_errors']}; "
              f"answers not matching their request {st['mismatch']}")
        print(f"   latency ms: p50 {1e3 * pct(lat, 50):.0f}, p90 {1e3 * pct(lat, 90):.0f}, p99 {1e3 * pct(lat, 99):.0f}, "
              f"max {1e3 * max(lat):.0f}, mean {1e3 * float(np.mean(lat)):.0f}; Little's law: {args.connections} x "
              f"{args.images} / {thr:.0f} = {1e3 * little:.0f} ms")
        print(f"   CPU: server {s_cpu:.2f} cores, its model worker process {w_cpu:.2f}, client {c_cpu:.2f} "
              f"(of {os.cpu_count()})")
        results.update(server_cores=s_cpu, worker_cores=w_cpu, client_cores=c_cpu, closed_inputs_per_s=thr, ratio=thr / offline, closed_5xx=st["5xx"], mismatch=st["mismatch"],
                       closed_p50_ms=1e3 * pct(lat, 50), closed_p99_ms=1e3 * pct(lat, 99),
                       closed_mean_ms=1e3 * float(np.mean(lat)), little_ms=1e3 * little)

        if args.closed_only:
            return
        # 4. open loop
        reqs4 = Requests(xin, ref, 4)
        rate = 0.5 * offline / 4
        po = asyncio.run(open_loop(port, reqs4, rate, args.poisson_duration, reuse_idle=args.reuse_idle_s))
        pl = po["lat"]
        print(f"\n4. open loop: Poisson arrivals of 4-image requests at {rate:.0f} requests/s = {4 * rate:.0f} inputs/s "
              f"(half the offline rate), {po['seconds']:.1f} s: {po['sent']} sent, {len(pl)} answered, errors "
              f"{po['errors']} {po['codes']}, shed by the client {po['shed']}, mismatches {po['mismatch']}; idle "
              f"connections not reused (idle > {args.reuse_idle_s} s) {po['stale_dropped']}")
        print(f"   latency ms (from the scheduled arrival): p50 {1e3 * pct(pl, 50):.1f}, p90 {1e3 * pct(pl, 90):.1f}, "
              f"p99 {1e3 * pct(pl, 99):.1f} (bar <= 250), max {1e3 * max(pl):.1f}")
        results.update(poisson_p50_ms=1e3 * pct(pl, 50), poisson_p99_ms=1e3 * pct(pl, 99), poisson_errors=po["errors"])

        # 5. malformed mix
        bad = malformed_requests(xin.shape[1:3], int(args.max_body_mb * 1024 * 1024))
        r0, w0 = rss_kib(server.pid), sum(rss_kib(c) for c in children(server.pid))
        mm = asyncio.run(closed_loop(port, reqs, args.connections, args.malformed_duration, malformed_share=0.1, bad=bad))
        r1, w1 = rss_kib(server.pid), sum(rss_kib(c) for c in children(server.pid))
        print(f"\n5. 10% malformed ({len(bad)} kinds), {mm['seconds']:.1f} s: {mm['bad']} malformed, {mm['bad_4xx']} got "
              f"a 4xx JSON error, wrong answers to malformed {mm['bad_wrong']}; {mm['good']} good answered, "
              f"mismatches {mm['mismatch']}, 5xx {mm['5xx']}, other {mm['other']}, {mm['inputs'] / mm['seconds']:.0f} "
              f"good inputs/s")
        print(f"   server VmRSS: after warm-up {rss0 / 1024:.0f} MiB; malformed phase start {r0 / 1024:.0f} MiB, end "
              f"{r1 / 1024:.0f} MiB ({100 * (r1 - r0) / r0:+.1f}%); its model worker process {w0 / 1024:.0f} -> "
              f"{w1 / 1024:.0f} MiB")
        results.update(malformed=mm["bad"], malformed_4xx=mm["bad_4xx"], malformed_5xx=mm["5xx"],
                       rss_start_mib=r0 / 1024, rss_end_mib=r1 / 1024, worker_rss_start_mib=w0 / 1024,
                       worker_rss_end_mib=w1 / 1024)

        # 6. kill mid-load, restart
        before = folder_state(work)

        async def kill_during_load() -> dict:
            load = asyncio.create_task(closed_loop(port, reqs, args.connections, 4.0))
            await asyncio.sleep(2.0)
            server.send_signal(signal.SIGKILL)
            return await load

        kd = asyncio.run(kill_during_load())
        server.wait()
        after = folder_state(work)
        port2 = free_port()
        server, up2 = start_server(args, files, port2)
        reqs.next = 0
        check = asyncio.run(closed_loop(port2, reqs, 8, 3.0))
        print(f"\n6. SIGKILL after 2 s of load: {kd['good']} answered before, {kd['conn_errors']} connection errors after; "
              f"files on disk unchanged: {before == after} ({len(after)} files); restart: /healthz answered in "
              f"{up2:.2f} s (bar <= 10); then {check['good']} requests answered, mismatches {check['mismatch']}, "
              f"5xx {check['5xx']}")
        results.update(restart_s=up2, disk_unchanged=before == after)
    finally:
        server.kill()
        server.wait()
    print("\nsummary: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
