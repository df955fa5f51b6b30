"""The Celery app: ``celery -A tasks.app worker`` (what ``imageq worker`` runs) starts here.

Settings are read once, here, at the worker's entry point.
"""

from __future__ import annotations

from celery import Celery

from imageq.api_client.celery_config import celery_config
from imageq.api_client.settings import Settings, SettingsError
from imageq.tasks.jobs import register_tasks
from imageq.tasks.signals import connect_signals
from imageq.tasks.state import WorkerState


def create_app(settings: Settings) -> Celery:
    app = Celery("imageq")
    app.conf.update(celery_config(settings, long_jobs=settings.worker_kind == "finetune"))
    state = WorkerState(settings, app)
    register_tasks(app, state)
    connect_signals(state)
    return app


try:
    _settings = Settings.from_env()
except SettingsError as exc:
    # Celery imports this module (celery -A tasks.app): a clean exit with the variable's
    # name, not a traceback from inside Celery's app loader.
    raise SystemExit(f"imageq: {exc}") from None

app = create_app(_settings)
