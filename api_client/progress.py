"""A one-line progress bar for long waits in a terminal (stderr, redrawn in place)."""

from __future__ import annotations

import time
from typing import TextIO

from api_client.schemas import JobRecord


class ProgressBar:
    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last = ""

    def render(self, record: JobRecord) -> str:
        progress = record.progress or {}
        step, total = int(progress.get("step", 0)), int(progress.get("total", 0))
        elapsed = time.monotonic() - self.started
        if total > 0:
            filled = int(self.WIDTH * min(step, total) / total)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            extra = ""
            if "loss" in progress:
                extra += f" loss {float(progress['loss']):.4f}"
            if progress.get("eta_s") is not None:
                extra += f" eta {float(progress['eta_s']):.0f}s"
            return f"{record.status:9} [{bar}] {step}/{total}{extra} {elapsed:.1f}s"
        return f"{record.status:9} {elapsed:.1f}s"

    def update(self, record: JobRecord) -> None:
        line = self.render(record)
        if line == self._last:
            return
        self._last = line
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
