"""The model in a worker process of its own, fed raw uint8 images over a pipe.

In one process the model thread needs Python's GIL between two torch operations (STRIP runs about
ten per chunk of six inputs) while the event loop thread holds it to parse and answer requests:
the two serialise and the server kept only ~1.45 of 2 cores busy (docs/serve.md). Here the model
runs in a child process (``python -m backdoorlab.serve.worker``) with its own interpreter; the
server process only parses, batches and answers.

The child rebuilds the guarded model from the same files the server loaded (model path, clean
set, ``--clean-size``, ``--arch``) and the fitted detector the server sends it as
:func:`~backdoorlab.api.defend.detector_bytes` (safetensors + JSON: the fingerprints of the model
and clean set are checked again). Nothing is pickled: requests and answers are fixed binary frames.

- request: ``b"BLQ1"``, n, c, h, w (little-endian uint32), then n*c*h*w uint8 bytes;
- answer: ``b"BLA1"``, 13 n (its length), then n int64 predictions, n float32 scores, n uint8 flags;
- error: ``b"BLE1"``, its length, then a UTF-8 message (the server answers it as a failed batch);
- ready: ``b"BLR1"``, its length, then a JSON object (the child's method, threshold, threads).

A child that dies is started again on the next batch (the batch it was running fails).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

import torch

from backdoorlab.errors import BackdoorLabError

log = logging.getLogger(__name__)

_REQ, _ANS, _ERR, _READY = b"BLQ1", b"BLA1", b"BLE1", b"BLR1"
_REQ_HEAD = struct.Struct("<4sIIII")
_HEAD = struct.Struct("<4sI")


class WorkerFailed(BackdoorLabError):
    """The worker process could not start, died, or failed on a batch."""


def _read_exact(f: IO[bytes], n: int) -> bytes:
    b = f.read(n)
    if b is None or len(b) != n:
        raise EOFError(f"the pipe closed after {0 if b is None else len(b)} of {n} bytes")
    return b


def _read_frame(f: IO[bytes]) -> tuple[bytes, int]:
    magic, n = _HEAD.unpack(_read_exact(f, _HEAD.size))
    return magic, n


@dataclass(frozen=True)
class WorkerSpec:
    """What the child needs to rebuild the guarded model: the files, and the fitted detector."""

    model: str
    clean: str
    clean_size: int | None
    arch: str | None
    detector: bytes
    threads: int


class ProcessWorker:
    """``guard(x)`` -> (predictions, scores, flagged) computed in the child process; ``in_flight``
    batches may be on their way at once (the batcher runs that many calls concurrently)."""

    in_flight = 2

    def __init__(self, spec: WorkerSpec, *, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.starts = 0
        self._send = threading.Lock()  # one writer at a time
        self._turn = threading.Condition()  # readers in the order the batches were sent
        self._sent = self._received = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ProcessWorker":
        """Start the child and wait until it has built the guarded model (its errors are raised here)."""
        self.close()
        head = {"model": self.spec.model, "clean": self.spec.clean, "clean_size": self.spec.clean_size,
                "arch": self.spec.arch, "threads": self.spec.threads, "detector_bytes": len(self.spec.detector)}
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("OMP_NUM_THREADS", str(self.spec.threads))
        self.proc = subprocess.Popen([sys.executable, "-m", "backdoorlab.serve.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.starts += 1
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(head).encode() + b"\n" + self.spec.detector)
            self.proc.stdin.flush()
            magic, n = _read_frame(self.proc.stdout)
            body = _read_exact(self.proc.stdout, n)
        except (OSError, EOFError, struct.error) as exc:
            code = self.proc.wait(timeout=10) if self.proc.poll() is None else self.proc.returncode
            self.close()
            raise WorkerFailed(f"the model worker process exited ({code}) before it was ready ({exc}); see its log above") from None
        if magic == _ERR:
            self.close()
            raise WorkerFailed(body.decode("utf-8", "replace"))
        if magic != _READY:
            self.close()
            raise WorkerFailed(f"the model worker answered {magic!r} instead of ready")
        self.info = json.loads(body)
        log.info("model worker pid %d ready: %s", self.proc.pid, self.info)
        return self

    def guard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predictions (B,), scores (B,), flagged (B,)) for uint8 images (B, C, H, W).

        Safe to call from two threads at once: the second batch is written to the pipe while the
        child still computes the first (so the child never waits for the server between two
        batches), and the answers are read back in the order the batches were sent."""
        x = x.contiguous()
        n, c, h, w = x.shape
        with self._send:
            if not self.alive:
                with self._turn:
                    if self._sent != self._received:  # a batch of the dead child is still being answered
                        self._turn.wait_for(lambda: self._sent == self._received)
                if not self.alive:
                    if self.proc is not None:
                        log.warning("the model worker process exited (%s); starting it again", self.proc.returncode)
                    self.start()
            proc = self.proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            ticket = self._sent
            self._sent += 1
            try:
                proc.stdin.write(_REQ_HEAD.pack(_REQ, n, c, h, w))
                proc.stdin.write(memoryview(x.numpy()).cast("B"))
                proc.stdin.flush()
                failure = None
            except OSError as exc:
                failure = exc
        with self._turn:
            self._turn.wait_for(lambda: self._received == ticket)
            try:
                if failure is not None:
                    raise failure
                magic, m = _read_frame(proc.stdout)
                if magic == _ERR:
                    raise WorkerFailed(_read_exact(proc.stdout, m).decode("utf-8", "replace"))
                if magic != _ANS or m != 13 * n:
                    raise EOFError(f"a frame {magic!r} of {m} bytes for {n} inputs")
                body = _read_exact(proc.stdout, m)
            except (OSError, EOFError, struct.error) as exc:
                proc.kill()
                raise WorkerFailed(f"the model worker process failed on a batch of {n} images ({exc}); it is started "
                                   "again on the next batch") from None
            finally:
                self._received += 1
                self._turn.notify_all()
        pred = torch.frombuffer(bytearray(body[:8 * n]), dtype=torch.int64)
        scores = torch.frombuffer(bytearray(body[8 * n:12 * n]), dtype=torch.float32)
        flagged = torch.frombuffer(bytearray(body[12 * n:]), dtype=torch.uint8).bool()
        return pred, scores, flagged

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        for f in (p.stdin, p.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- the child
def _write(out: IO[bytes], magic: bytes, body: bytes) -> None:
    out.write(_HEAD.pack(magic, len(body)) + body)
    out.flush()


def main() -> int:
    # the frames own stdout: keep a private copy of it and send anything printed to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    from backdoorlab.runtime import tune_allocator

    tune_allocator()  # as the backdoorlab command does: large tensors reuse freed memory, no page faults
    logging.basicConfig(level=logging.WARNING, format="worker %(levelname)s %(name)s: %(message)s")
    try:
        head = json.loads(inp.readline())
        blob = _read_exact(inp, int(head["detector_bytes"]))
        torch.set_num_threads(int(head["threads"]))
        from backdoorlab.serve.service import GuardService

        svc = GuardService.build(head["model"], head["clean"], threshold_file=blob, clean_size=head["clean_size"],
                                 arch=head["arch"])
    except Exception as exc:  # noqa: BLE001 - sent to the server, which raises it
        _write(out, _ERR, f"the model worker could not build the guarded model: {exc}".encode())
        return 1
    try:
        _write(out, _READY, json.dumps({"method": svc.method, "threshold": svc.threshold, "pid": os.getpid(),
                                        "threads": torch.get_num_threads()}).encode())
    except BrokenPipeError:
        return 0
    while True:
        try:
            head_b = inp.read(_REQ_HEAD.size)
            if not head_b:
                return 0  # the server closed the pipe
            magic, n, c, h, w = _REQ_HEAD.unpack(head_b)
            if magic != _REQ:
                _write(out, _ERR, f"unknown frame {magic!r}".encode())
                return 2
            x = torch.frombuffer(bytearray(_read_exact(inp, n * c * h * w)), dtype=torch.uint8).view(n, c, h, w)
        except (EOFError, struct.error):
            return 0
        try:
            pred, scores, flagged = svc.guard(x)
        except Exception as exc:  # noqa: BLE001 - one failed batch, the worker goes on
            _write(out, _ERR, f"the model failed on a batch of {n} images: {exc}".encode())
            continue
        try:
            _write(out, _ANS, pred.to(torch.int64).numpy().tobytes() + scores.to(torch.float32).numpy().tobytes()
                   + flagged.to(torch.uint8).numpy().tobytes())
        except BrokenPipeError:
            return 0  # the server went away mid-batch


if __name__ == "__main__":
    sys.exit(main())
