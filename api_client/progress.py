"""A one-line progress bar for long client waits (``submit --wait``, ``get --follow``).

On a terminal the line is redrawn in place; into a pipe or a log file it writes a new
line only when the status changes or another tenth of the work is done, so a 1000-step
training job does not write 1000 lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from imageq.api_client.schemas import JobRecord


def _number(value: Any) -> float | None:
    """Progress comes from workers; a malformed field is skipped, never a crash."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressBar:
    WIDTH = 30

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.tty = stream.isatty()
        self.started = clock()
        # When this client first saw the job running with a step count: the ETA's origin.
        self._running_since: tuple[float, float] | None = None
        self._last = ""
        self._last_key: tuple[str, int] | None = None
        self._drawn_width = 0

    def _fraction(self, record: JobRecord) -> tuple[float, float] | None:
        progress = record.progress or {}
        step, total = _number(progress.get("step")), _number(progress.get("total"))
        if step is None or total is None or total <= 0:
            return None
        return max(0.0, min(step, total)), total

    def _eta_s(self, record: JobRecord, step: float, total: float) -> float | None:
        given = _number((record.progress or {}).get("eta_s"))
        if given is not None:
            return given
        if self._running_since is None or record.status != "running":
            return None
        since, first_step = self._running_since
        done = step - first_step
        elapsed = self.clock() - since
        if done <= 0 or elapsed <= 0:
            return None
        return (total - step) * elapsed / done

    def render(self, record: JobRecord) -> str:
        elapsed = _duration(self.clock() - self.started)
        head = f"{record.status:9}"
        if record.error is not None:
            head += f" ({record.error.code})"
        fraction = self._fraction(record)
        if fraction is None:
            return f"{head} {record.kind} {elapsed}"
        step, total = fraction
        filled = int(self.WIDTH * step / total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        progress = record.progress or {}
        text = f"{head} [{bar}] {step:.0f}/{total:.0f} {100 * step / total:3.0f}%"
        stage = progress.get("stage")
        if isinstance(stage, str) and stage:
            text += f" {stage[:20]}"
        loss = _number(progress.get("loss"))
        if loss is not None:
            text += f" loss {loss:.4f}"
        eta = self._eta_s(record, step, total)
        if eta is not None and record.status == "running":
            text += f" eta {_duration(eta)}"
        return f"{text} {elapsed}"

    def update(self, record: JobRecord) -> None:
        fraction = self._fraction(record)
        if record.status == "running" and fraction is not None and self._running_since is None:
            self._running_since = (self.clock(), fraction[0])
        line = self.render(record)
        if line == self._last:
            return
        self._last = line
        if self.tty:
            # Pad over whatever a longer previous line left on the screen.
            self.stream.write("\r" + line.ljust(self._drawn_width))
            self._drawn_width = max(self._drawn_width, len(line))
        else:
            tenth = -1 if fraction is None else int(10 * fraction[0] / fraction[1])
            key = (record.status, tenth)
            if key == self._last_key:
                return
            self._last_key = key
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
