"""Wall-clock timing of scoring work (synchronising CUDA so that GPU time is counted where it is spent)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


@contextmanager
def timed(record: list[float], device: torch.device | None = None):
    """Append the elapsed seconds of the body to `record` (one-element accumulator list)."""
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        record[0] += time.perf_counter() - start
