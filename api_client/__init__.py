"""imageq's producer side: the contract, the client, webhook verification, the CLI.

Light on purpose: a backend service installs only this (no torch).
"""

from imageq.api_client.client import Client
from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.schemas import JobDocument, JobRecord, JobStatus, parse_job
from imageq.api_client.settings import Settings

__all__ = [
    "Client",
    "ImageqError",
    "InvalidInput",
    "JobDocument",
    "JobRecord",
    "JobStatus",
    "Settings",
    "parse_job",
]
