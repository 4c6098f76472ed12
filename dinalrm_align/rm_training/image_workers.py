"""Image reads in reader processes, with a time limit per image that really stops a stuck read.

Why processes: a Python thread cannot be stopped from outside, so a decode stuck in C code (or a
read blocked on a dead network mount) would keep its thread, its memory and the GIL-free decoder
busy forever; ``signal.alarm`` only works in the main thread and cannot interrupt C code either.
A reader process can be killed. :class:`ImageReaders` keeps ``workers`` reader processes
(``python -m dinalrm_align.rm_training.image_workers``, which imports only Pillow and numpy),
hands them reads in order, and kills and replaces a reader whose current read runs past
``timeout`` seconds (that image becomes an ``ImageFault("timeout")``) or which dies (``reader_crashed``).
The other reads continue on the replacement.

Protocol (no pickle): the parent sends a JSON request ``{"op": "size"|"pixels", "path", "bucket"}``
(``path`` null = the image bytes follow as a second message); the reader answers with a JSON header
(``{"ok": true, "size": [h, w]}``, ``{"ok": true, "shape": [h, w, 3]}`` + the uint8 pixel bytes, or
``{"ok": false, "reason", "detail"}``).

``workers=0`` reads in the calling process (no time limit; for debugging).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from dinalrm_align.rm_training.image_io import DEFAULT_MAX_PIXELS, ImageFault, decode_rgb, read_size

Request = tuple[str, str | bytes, tuple[int, int] | None]  # (op, ref, bucket)
#: Seconds a reader process may take to start (import Pillow and numpy).
STARTUP_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------- reader side
def _answer(op: str, ref: str | bytes, bucket: Sequence[int] | None, max_pixels: int) -> tuple[dict, bytes | None]:
    try:
        if op == "size":
            return {"ok": True, "size": list(read_size(ref, max_pixels))}, None
        array = decode_rgb(ref, (int(bucket[0]), int(bucket[1])), max_pixels)  # type: ignore[index]
        return {"ok": True, "shape": list(array.shape)}, array.tobytes()
    except ImageFault as fault:
        return {"ok": False, "reason": fault.reason, "detail": fault.detail}, None


def serve(requests: Connection, answers: Connection, max_pixels: int) -> None:
    """The reader loop: answer requests until the parent closes its end."""
    answers.send_bytes(b'{"ready": true}')
    while True:
        try:
            header = json.loads(requests.recv_bytes())
            ref = header["path"] if header["path"] is not None else requests.recv_bytes()
        except (EOFError, OSError):
            return
        reply, payload = _answer(header["op"], ref, header.get("bucket"), max_pixels)
        try:
            answers.send_bytes(json.dumps(reply).encode())
            if payload is not None:
                answers.send_bytes(payload)
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="image reader process of dinalrm-align preprocess (internal)")
    p.add_argument("--requests-fd", type=int, required=True)
    p.add_argument("--answers-fd", type=int, required=True)
    p.add_argument("--max-pixels", type=int, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then closes the pipes
    serve(Connection(args.requests_fd, writable=False), Connection(args.answers_fd, readable=False), args.max_pixels)
    return 0


# ---------------------------------------------------------------------------------------------- parent side
@dataclass
class _Reader:
    proc: subprocess.Popen
    requests: Connection
    answers: Connection
    pending: deque[int] = field(default_factory=deque)  # request indices sent, oldest first
    started: float = 0.0  # when the oldest pending request started


class ImageReaders:
    """A small pool of reader processes with a per-image time limit (use as a context manager)."""

    def __init__(
        self, workers: int = 2, timeout: float | None = 60.0, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout is not None and timeout <= 0:
            timeout = None
        if workers == 0 and timeout is not None:
            raise ValueError("a time limit per image needs reader processes: use workers >= 1 or no timeout")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.workers, self.timeout, self.max_pixels = workers, timeout, max_pixels
        self._readers: list[_Reader] = []
        self.restarts = 0

    def __enter__(self) -> ImageReaders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public
    def sizes(self, refs: Sequence[str | bytes]) -> list[tuple[int, int] | ImageFault]:
        """``(height, width)`` or an :class:`ImageFault` per image, in order."""
        return self.run([("size", ref, None) for ref in refs])

    def pixels(self, jobs: Sequence[tuple[str | bytes, tuple[int, int]]]) -> list[np.ndarray | ImageFault]:
        """uint8 (H, W, 3) resized to each job's bucket ``(H, W)``, or an :class:`ImageFault`, in order."""
        return self.run([("pixels", ref, bucket) for ref, bucket in jobs])

    def run(self, requests: Sequence[Request]) -> list[Any]:
        """Answer ``requests`` (``(op, ref, bucket)``) in order: values or :class:`ImageFault` s."""
        if self.workers == 0:
            return [self._local(r) for r in requests]
        for reader in [r for r in self._readers if r.pending]:  # left over by an interrupted call
            self._stop(reader, kill=True)
            self._readers.remove(reader)
        results: list[Any] = [None] * len(requests)
        queue = deque(range(len(requests)))
        remaining = len(requests)
        # Several small size answers may wait in a pipe; a pixel answer (MBs) fills it, so only one
        # pixel request is in flight per reader: it never blocks writing an answer while the parent
        # blocks writing it the next image's bytes.
        depth = 8 if all(op == "size" for op, _, _ in requests) else 1
        while remaining:
            self._start_readers()
            for reader in self._readers:
                while queue and len(reader.pending) < depth:
                    i = queue.popleft()
                    if not reader.pending:
                        reader.started = time.monotonic()
                    reader.pending.append(i)
                    if not self._send(reader, requests[i]):
                        break
            busy = [r for r in self._readers if r.pending]
            limit = None
            if self.timeout is not None:
                limit = max(0.0, min(r.started for r in busy) + self.timeout - time.monotonic())
            ready = wait([r.answers for r in busy], timeout=limit)
            for reader in busy:
                if reader.answers in ready:
                    try:
                        results[reader.pending[0]] = self._receive(reader)
                    except (EOFError, OSError):
                        code = reader.proc.poll()
                        remaining -= self._fail(reader, results, queue, ImageFault(
                            "reader_crashed", f"the reader process died while reading it (exit code {code})"
                        ))
                        continue
                    reader.pending.popleft()
                    reader.started = time.monotonic()
                    remaining -= 1
                elif self.timeout is not None and time.monotonic() - reader.started > self.timeout:
                    remaining -= self._fail(reader, results, queue, ImageFault(
                        "timeout", f"reading took longer than {self.timeout:g} s; the reader process was killed"
                    ))
        return results

    def close(self) -> None:
        """Stop the reader processes (they exit when their request pipe closes; killed after 5 s)."""
        for reader in self._readers:
            self._stop(reader)
        self._readers = []

    # ------------------------------------------------------------------ internals
    def _local(self, request: Request) -> Any:
        op, ref, bucket = request
        try:
            return read_size(ref, self.max_pixels) if op == "size" else decode_rgb(ref, bucket, self.max_pixels)
        except ImageFault as fault:
            return fault

    def _start_readers(self) -> None:
        while len(self._readers) < self.workers:
            self._readers.append(self._spawn())

    def _spawn(self) -> _Reader:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable, "-m", "dinalrm_align.rm_training.image_workers",
            "--requests-fd", str(req_r), "--answers-fd", str(ans_w), "--max-pixels", str(self.max_pixels),
        ]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(req_r, ans_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(req_r)
            os.close(ans_w)
        reader = _Reader(proc, Connection(req_w, readable=False), Connection(ans_r, writable=False))
        if not reader.answers.poll(STARTUP_TIMEOUT):
            self._stop(reader)
            raise RuntimeError(f"an image reader process did not start within {STARTUP_TIMEOUT:g} s")
        try:
            reader.answers.recv_bytes()  # {"ready": true}
        except (EOFError, OSError) as exc:
            self._stop(reader)
            raise RuntimeError(f"an image reader process failed to start (exit code {proc.poll()})") from exc
        return reader

    def _send(self, reader: _Reader, request: Request) -> bool:
        op, ref, bucket = request
        header = {"op": op, "path": ref if isinstance(ref, str) else None, "bucket": list(bucket) if bucket else None}
        try:
            reader.requests.send_bytes(json.dumps(header).encode())
            if not isinstance(ref, str):
                reader.requests.send_bytes(bytes(ref))
        except OSError:
            return False  # the reader died; its answer pipe reports EOF and the request is handled there
        return True

    def _receive(self, reader: _Reader) -> Any:
        reply = json.loads(reader.answers.recv_bytes())
        if not reply["ok"]:
            return ImageFault(reply["reason"], reply["detail"])
        if "size" in reply:
            return tuple(reply["size"])
        shape = tuple(reply["shape"])
        return np.frombuffer(reader.answers.recv_bytes(), dtype=np.uint8).reshape(shape)

    def _fail(self, reader: _Reader, results: list[Any], queue: deque[int], fault: ImageFault) -> int:
        """Record ``fault`` for the reader's current request, requeue its others, replace it; returns 1."""
        results[reader.pending.popleft()] = fault
        queue.extendleft(reversed(reader.pending))
        reader.pending.clear()
        self._stop(reader, kill=True)
        self._readers.remove(reader)
        self.restarts += 1
        return 1

    @staticmethod
    def _stop(reader: _Reader, kill: bool = False) -> None:
        for conn in (reader.requests, reader.answers):
            conn.close()
        if not kill:
            try:
                reader.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            reader.proc.kill()
            reader.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
