"""Warm a model's file into the page cache before its load starts.

A load from a cold page cache reads the file from disk at disk speed; a warm one copies from
memory. When a request for a model is queued, or its load waits for evictions, reading the
file in the background turns the load that follows into a warm one. One read at a time per
file; the read stops early when the file is already cached (it then costs a memory pass).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("runtimes.prefetch")
CHUNK = 16 << 20
_running: dict[str, threading.Thread] = {}
_lock = threading.Lock()


def read_through(path: Path, chunk: int = CHUNK) -> int:
    """Read `path` once, sequentially (after telling the kernel so). Returns the bytes read."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        while block := os.read(fd, chunk):
            total += len(block)
    finally:
        os.close(fd)
    return total


def prefetch(path: Path) -> threading.Thread | None:
    """Start warming `path` in a background thread (none if it is already being warmed or
    does not exist). Returns the thread."""
    key = str(path)
    if not path.is_file():
        return None
    with _lock:
        running = _running.get(key)
        if running is not None and running.is_alive():
            return None

        def run() -> None:
            t0 = time.perf_counter()
            try:
                n = read_through(path)
                log.info(
                    "prefetched file=%s bytes=%d ms=%.0f", path, n, (time.perf_counter() - t0) * 1e3
                )
            except OSError as exc:
                log.warning("prefetch of %s failed: %s", path, exc)

        thread = threading.Thread(target=run, name=f"prefetch {path.name}", daemon=True)
        _running[key] = thread
        thread.start()
        return thread
