"""Peak memory of a block of work: CUDA's allocator peak, or on CPU the process's resident set sampled by a
background thread (the kernel's lifetime peak, ru_maxrss, would include whatever ran before the block)."""

from __future__ import annotations

import resource
import sys
import threading

import torch


class PeakMemory:
    """with PeakMemory(device) as m: ...; m.summary() -> {"peak_rss_mb", "rss_before_mb", ...}."""

    def __init__(self, device: torch.device | str, interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.before = self.peak = None
        self.cuda_peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self.peak = _rss()
        if self.before is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            now = _rss()
            if now is not None and now > self.peak:
                self.peak = now

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = _rss()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        return False

    def summary(self) -> dict:
        mb = 2.0**20
        out = {"peak_rss_mb": None if self.peak is None else self.peak / mb,
               "rss_before_mb": None if self.before is None else self.before / mb,
               "process_max_rss_mb": _maxrss() / mb}
        if self.cuda_peak is not None:
            out["cuda_peak_mb"] = self.cuda_peak / mb
        return out

    @staticmethod
    def describe(s: dict) -> str:
        if s.get("cuda_peak_mb") is not None:
            return f"CUDA peak {s['cuda_peak_mb']:.0f} MB"
        if s.get("peak_rss_mb") is not None:
            return f"peak RSS {s['peak_rss_mb']:.0f} MB (+{s['peak_rss_mb'] - s['rss_before_mb']:.0f} MB in training)"
        return f"process peak RSS {s['process_max_rss_mb']:.0f} MB"


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux
