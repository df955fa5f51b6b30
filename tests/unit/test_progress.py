"""The client's progress bar, fed a scripted sequence of job records and a fake clock."""

from __future__ import annotations

import io
import itertools
from typing import Any

from imageq.api_client.progress import ProgressBar
from imageq.api_client.schemas import JobRecord


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(status: str, progress: dict[str, Any] | None = None, **extra: Any) -> JobRecord:
    return JobRecord.model_validate(
        {
            "id": "job-1",
            "kind": "generate",
            "status": status,
            "progress": progress,
            "created_at": "2025-01-01T00:00:00.000Z",
            **extra,
        }
    )


def diffusion_sequence() -> list[tuple[float, JobRecord]]:
    """(seconds since start, record) as a 20-step diffusion job reports them."""
    seq = [(0.0, record("queued")), (0.5, record("running"))]
    for step in range(1, 21):
        seq.append((0.5 + step * 0.5, record("running", {"step": step, "total": 20})))
    seq.append((11.0, record("succeeded", {"step": 20, "total": 20})))
    return seq


def play(bar: ProgressBar, clock: FakeClock, seq: list[tuple[float, JobRecord]]) -> None:
    start = clock.now
    for at, rec in seq:
        clock.now = start + at
        bar.update(rec)
    bar.close()


def test_pipe_output_is_one_line_per_status_or_tenth() -> None:
    out, clock = io.StringIO(), FakeClock()
    play(ProgressBar(out, clock=clock), clock, diffusion_sequence())
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("queued") and "generate" in lines[0]
    assert lines[1].startswith("running")
    # 20 steps in tenths: at most one line per 10 %, never one per step.
    running = [line for line in lines if line.startswith("running") and "[" in line]
    assert 8 <= len(running) <= 11
    assert "[" + "#" * 15 + "-" * 15 + "] 10/20  50%" in "\n".join(running)
    assert lines[-1].startswith("succeeded") and "20/20 100%" in lines[-1]
    assert "eta" not in lines[-1]
    assert "\r" not in out.getvalue()


def test_eta_from_observed_rate() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(out, clock=clock)
    bar.update(record("running", {"step": 0, "total": 100}))
    clock.now += 10
    # 20 steps in 10 s: 80 left at 2 steps/s is 40 s.
    line = bar.render(record("running", {"step": 20, "total": 100, "stage": "denoising"}))
    assert "20/100  20%" in line and "denoising" in line and "eta 40.0s" in line
    given = bar.render(record("running", {"step": 20, "total": 100, "eta_s": 3600, "loss": 0.5}))
    assert "eta 1h00m" in given and "loss 0.5000" in given


def test_terminal_redraws_in_place_and_ends_with_newline() -> None:
    out, clock = TTY(), FakeClock()
    play(ProgressBar(out, clock=clock), clock, diffusion_sequence())
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert len(frames) >= 20  # every step redrawn
    assert frames[-1].startswith("succeeded")
    # Each frame is padded to the widest one before it, so no stale characters remain.
    widths = [len(f) for f in frames]
    assert all(b >= a for a, b in itertools.pairwise(widths))


def test_failed_job_shows_error_code_and_malformed_progress_is_ignored() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(out, clock=clock)
    bar.update(record("running", {"step": "many", "total": None}))
    bar.update(record("running", {"step": 3, "total": 0}))
    bar.update(
        record(
            "failed",
            {"step": 7, "total": 30},
            error={"code": "out_of_memory", "message": "CUDA out of memory"},
        )
    )
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("running") and "[" not in lines[0]
    assert lines[-1].startswith("failed") and "(out_of_memory)" in lines[-1]
    assert "7/30" in lines[-1]


def test_long_durations_are_readable() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(out, clock=clock)
    clock.now += 3725
    assert bar.render(record("queued")).endswith("1h02m")
    clock.now -= 3725 - 75
    assert bar.render(record("queued")).endswith("1m15s")
