"""imageq's producer side: the contract, the client, webhook verification, the CLI.

Light on purpose: a backend service installs only this (no torch).
"""

from api_client.errors import ImageqError, InvalidInput
from api_client.schemas import JobDocument, JobRecord, parse_job

__all__ = ["ImageqError", "InvalidInput", "JobDocument", "JobRecord", "parse_job"]
