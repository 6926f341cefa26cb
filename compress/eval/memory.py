"""Peak resident memory over a stretch of work, sampled by a background thread."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

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


def peak_rss() -> int:
    """This process's peak resident memory, in bytes.

    Linux: VmHWM, the high-water mark of this program's own memory. Not ru_maxrss: a process
    started by fork + exec inherits its parent's high-water mark there, so a small measuring
    process spawned by a large one would report the large one's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
