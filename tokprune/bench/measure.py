"""Low-level measurements: synchronised wall time, peak memory, KV-cache bytes."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def return_freed_memory_to_os() -> None:
    """Make glibc hand freed tensor memory back at once (fixed 64 KiB mmap threshold, no dynamic raise).

    Without it glibc raises its mmap threshold after the first large free and keeps later buffers in the
    heap, so the process RSS stops tracking live memory and CPU peaks read as 0.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU; on CPU the process RSS sampled every ms.

    Two numbers, in bytes:
      rise_bytes: the peak above what was in use when the block started (what the block itself cost:
          activations, the KV cache it built, a score matrix; the weights already loaded are not in it);
      absolute_bytes: the peak itself (`torch.cuda.max_memory_allocated` on GPU, tensors only, not the
          allocator's reserve; the process resident set size on CPU, weights, Python and libraries included).
    `peak_bytes` is the former name of `rise_bytes`. On CPU call `return_freed_memory_to_os()` once first,
    or freed buffers stay counted as in use.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.001) -> None:
        self.device, self.interval_s = device, interval_s
        self.start_bytes = self.absolute_bytes = 0
        self._stop = threading.Event()

    @property
    def rise_bytes(self) -> int:
        """Peak above the memory in use when the block started."""
        return self.absolute_bytes - self.start_bytes

    @property
    def peak_bytes(self) -> int:
        """The former name of `rise_bytes` (kept for the code that reads it)."""
        return self.rise_bytes

    def fields(self, name: str) -> dict[str, int]:
        """The record entries of this block named `name` ("prefill", "e2e"): peak_<name>_rise_bytes,
        peak_<name>_absolute_bytes, and peak_<name>_bytes, the former name of the rise, for old readers."""
        return {
            f"peak_{name}_rise_bytes": self.rise_bytes,
            f"peak_{name}_absolute_bytes": self.absolute_bytes,
            f"peak_{name}_bytes": self.rise_bytes,
        }

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = _rss_bytes()
            self._peak = self.start_bytes
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.absolute_bytes = max(self._peak, _rss_bytes())


@contextmanager
def stopwatch(record: dict, key: str, device: torch.device):
    """Store the elapsed seconds of the body in record[key] (CUDA synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    record[key] = time.perf_counter() - start


def kv_cache_bytes(past_key_values) -> int:
    """Bytes held by the keys and values of a transformers cache (0 for None)."""
    total = 0
    for layer in getattr(past_key_values, "layers", None) or []:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_lengths(past_key_values) -> list[int]:
    """Keys per layer of a cache (the padded length every row shares)."""
    return [
        int(layer.keys.shape[-2])
        for layer in past_key_values.layers
        if getattr(layer, "keys", None) is not None
    ]


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average, "n/a" where the system has none."""
    import os

    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return "n/a"
