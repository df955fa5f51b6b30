"""Webhook ids: one per event, the same when the same event is sent again."""

from __future__ import annotations

from imageq.api_client.webhooks import event_id, progress_key

CREATED = "2026-12-08T01:39:24.123Z"


def test_final_events_have_one_id_per_job() -> None:
    assert event_id("j1", "job.succeeded", CREATED) == "msg_j1_1796693964123_succeeded"
    assert event_id("j1", "job.succeeded", CREATED) == event_id("j1", "job.succeeded", CREATED)
    assert event_id("j1", "job.failed", CREATED) != event_id("j1", "job.succeeded", CREATED)


def test_a_job_id_used_again_after_its_record_expired_gets_new_event_ids() -> None:
    """An idempotency key names the same job id again once the first record expired: the
    new job's events must not be de-duplicated against the old one's."""
    later = "2026-12-15T09:00:00.000Z"
    assert event_id("j1", "job.succeeded", later) != event_id("j1", "job.succeeded", CREATED)
    key = progress_key(1, {"stage": "training", "step": 5})
    assert event_id("j1", "job.progress", later, key) != event_id(
        "j1", "job.progress", CREATED, key
    )


def test_progress_ids_differ_by_attempt_stage_and_step() -> None:
    stages = [
        {"stage": "dataset", "step": 0},
        {"stage": "auto_caption", "step": 0},
        {"stage": "preparing", "step": 0},
        {"stage": "training", "step": 0},
        {"stage": "training", "step": 60},
        {"stage": "publishing", "step": 60},
    ]
    ids = [event_id("j1", "job.progress", CREATED, progress_key(1, p)) for p in stages]
    assert len(set(ids)) == len(ids)
    # A resumed run (attempt 2) repeats steps: its events are new events.
    again = event_id("j1", "job.progress", CREATED, progress_key(2, stages[4]))
    assert again not in ids
    # The same event re-sent keeps its id, so receivers de-duplicate it.
    assert event_id("j1", "job.progress", CREATED, progress_key(1, stages[4])) == ids[4]


def test_stage_names_are_made_safe_for_an_id() -> None:
    key = progress_key(1, {"stage": "auto caption/1", "step": 3})
    assert key == "a1_auto-caption-1_3"
    assert progress_key(3, {}) == "a3_run_0"
