"""Fresh presigned URLs for a record's stored files, made when the record is read.

Presigned S3 URLs expire (seven days at most), while records and result.json live on;
``Client.get(id, presign=True)`` signs every ``s3://`` file of a record anew. Signing
is local: no request reaches S3.
"""

from __future__ import annotations

from typing import Any

from imageq.api_client.schemas import JobRecord
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import STORAGE_SCHEME, local_root, s3_client

# SigV4 presigned URLs cannot live longer than seven days.
MAX_PRESIGN_TTL_S = 7 * 24 * 3600


def presign(uri: str, ttl_s: int) -> str | None:
    """A presigned HTTPS URL for an ``s3://bucket/key`` URI; None for other storage."""
    if uri[:5].lower() != "s3://":
        return None
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        return None
    url: str = s3_client().generate_presigned_url(
        "get_object",
        Params={"Bucket": bucket, "Key": key},
        ExpiresIn=max(1, min(ttl_s, MAX_PRESIGN_TTL_S)),
    )
    return url


def with_fresh_urls(record: JobRecord, ttl_s: int) -> JobRecord:
    """The record with every stored file's ``url`` (and ``result_url``) signed anew."""
    fresh = record.model_copy(deep=True)
    if fresh.result_uri:
        fresh.result_url = presign(fresh.result_uri, ttl_s) or fresh.result_url
    if fresh.output is not None:
        fresh.output = _resign(fresh.output, ttl_s)
    return fresh


def _resign(value: Any, ttl_s: int) -> Any:
    # Outputs name their files as {"uri": "s3://...", "url": "https://..."} wherever they
    # sit (images[], captions[].attention.overlay, ...): walk the whole document.
    if isinstance(value, dict):
        out = {k: _resign(v, ttl_s) for k, v in value.items()}
        uri = out.get("uri")
        if isinstance(uri, str):
            url = presign(uri, ttl_s)
            if url is not None:
                out["url"] = url
        return out
    if isinstance(value, list):
        return [_resign(v, ttl_s) for v in value]
    return value


def storage_root(settings: Settings) -> str:
    """What every stored file's ``uri`` starts with (``s3://bucket/prefix/``,
    ``file:///abs/root/``): the part a tenant is not shown."""
    url = settings.storage_url
    if url[:5].lower() == "s3://":
        bucket, _, prefix = url[5:].partition("/")
        stripped = prefix.strip("/")
        return f"s3://{bucket}/" + (stripped + "/" if stripped else "")
    return local_root(url).as_uri().rstrip("/") + "/"


def hide_storage_root(value: Any, root: str) -> Any:
    """``value`` (a record's JSON) with the storage root in every string replaced by
    ``storage://``: a tenant sees ``storage://jobs/{id}/image-0.png``, never the bucket,
    prefix or folder (presigned ``url``s stay: they are what a tenant downloads)."""
    if isinstance(value, str):
        return value.replace(root, STORAGE_SCHEME) if root in value else value
    if isinstance(value, dict):
        return {k: hide_storage_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_storage_root(v, root) for v in value]
    return value


#: A diffusion job's latest step preview, overwritten per preview, beside its outputs.
PREVIEW_FILE = "preview.jpg"
#: A step preview is ~10 KB (a 256 px JPEG); anything far larger is not one.
MAX_PREVIEW_BYTES = 1024 * 1024


def preview_key(job_id: str) -> str:
    """The storage key of a job's step preview: under the job's own ``jobs/{id}/``."""
    return f"jobs/{job_id}/{PREVIEW_FILE}"
