"""imageq: asynchronous jobs for vision models (docs/design.md).

One installed package. ``imageq.api_client`` is the contract and the producer side (the
light client a backend installs: no torch); ``imageq.workers`` the Celery-free runtime
of the model workers; ``imageq.tasks`` and ``imageq.gateway`` the two doors, Celery and
HTTP. What a backend service needs is here at the top.
"""

from imageq.api_client.client import Client
from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.schemas import JobDocument, JobRecord, JobStatus, parse_job
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import WebhookVerificationError, verify

__all__ = [
    "Client",
    "ImageqError",
    "InvalidInput",
    "JobDocument",
    "JobRecord",
    "JobStatus",
    "Settings",
    "WebhookVerificationError",
    "parse_job",
    "verify",
]
