"""Peak resident memory over a stretch of work, sampled by a background thread."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """with PeakRSS() as peak: ...; peak.bytes is the highest RSS seen (every `interval` s)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, self._proc.memory_info().rss)
