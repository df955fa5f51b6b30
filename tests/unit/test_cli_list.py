"""``imageq list``: a table a person reads; ``--json`` for the records."""

from __future__ import annotations

import time

from imageq.api_client.cli import format_jobs
from imageq.api_client.records import new_record, utcnow
from imageq.api_client.schemas import ErrorRecord, JobRecord, JobStatus


def _record(job_id: str, status: JobStatus, **changes: object) -> JobRecord:
    rec = new_record({"id": job_id, "kind": "caption"}, now=utcnow())
    return rec.model_copy(update={"status": status, **changes})


def test_table_has_one_row_per_job_with_age_run_time_and_error() -> None:
    ok = _record("job-ok", JobStatus.SUCCEEDED, metrics={"queue_s": 0.1, "run_s": 1.234})
    bad = _record(
        "job-bad",
        JobStatus.FAILED,
        error=ErrorRecord(code="invalid_input", message="input.images[0]: too large"),
    )
    table = format_jobs([ok, bad], now=time.time() + 3600 * 3)
    lines = table.splitlines()
    assert lines[0].split() == ["id", "kind", "status", "age", "run", "error"]
    assert lines[1].split() == ["job-ok", "caption", "succeeded", "3h", "1.23s"]
    assert lines[2].split() == ["job-bad", "caption", "failed", "3h", "-", "invalid_input"]
    # Columns line up: every row starts its status at the same offset.
    offsets = {
        line.index(word) for line, word in zip(lines[1:], ["succeeded", "failed"], strict=True)
    }
    assert len(offsets) == 1


def test_no_jobs() -> None:
    assert format_jobs([], now=0.0) == "(no jobs)"
