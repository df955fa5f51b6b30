"""``auto_caption``: caption a dataset's unlabelled images with the deployment's caption jobs.

The training worker does not load BLIP: it enqueues ordinary caption jobs (through
``api_client.Client`` with its own settings) and waits for them, so the warm caption
workers do the work, batched with everything else they serve. Each chunk's job has an
idempotency key derived from the finetune job, so a resumed finetune job finds the
captions of its earlier attempt instead of asking again.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from api_client.client import Client
from api_client.errors import Canceled, JobTimeout, ModelError
from api_client.schemas import FINAL_STATUSES
from api_client.settings import Settings
from workers.io.storage import Storage
from workers.training.datasets import Example

# Images per caption job: the caption worker batches across jobs anyway, and small
# chunks keep each message small.
CHUNK_IMAGES = 8
# BLIP looks at 384 px; a larger copy would only make the message bigger.
CAPTION_SIDE = 384
_WAIT_SLICE_S = 1.0

Check = Callable[[], None]
Progress = Callable[[int, int], None]


def image_ref(
    example: Example, settings: Settings, storage: Storage, job_id: str, index: int
) -> str:
    """A reference a caption worker can read: the deployment's S3, else a data URI."""
    image = example.load(settings)
    image.thumbnail((CAPTION_SIDE, CAPTION_SIDE), Image.Resampling.BICUBIC)
    for quality in (90, 75, 50):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        key = f"jobs/{job_id}/auto_caption/{index}.jpg"
        if storage.uri(key).startswith("s3://"):
            return storage.put(key, data, "image/jpeg")
        if len(data) <= settings.max_data_uri_bytes:
            return "data:image/jpeg;base64," + base64.b64encode(data).decode()
    raise ModelError(f"auto_caption: {example.file_name}: too large to send inline")


def auto_caption(
    examples: list[Example],
    settings: Settings,
    storage: Storage,
    job_id: str,
    check: Check,
    progress: Progress,
    client: Client | None = None,
) -> dict[str, str]:
    """Captions for ``examples`` by file name; ``check`` raises to stop (cancel, timeout)."""
    owned = client is None
    client = client or Client(settings)
    pending: dict[str, list[Example]] = {}
    try:
        for start in range(0, len(examples), CHUNK_IMAGES):
            chunk = examples[start : start + CHUNK_IMAGES]
            refs = [image_ref(e, settings, storage, job_id, start + i) for i, e in enumerate(chunk)]
            record = client.caption(
                images=refs,
                idempotency_key=f"{job_id}:auto_caption:{start}",
                metadata={"finetune_job": job_id},
            )
            pending[record.id] = chunk
            check()
        return _collect(client, pending, settings, check, progress, len(examples))
    except (Canceled, JobTimeout):
        for caption_id in pending:
            try:
                if client.get(caption_id).status not in FINAL_STATUSES:
                    client.cancel(caption_id)
            except Exception:  # the finetune job is ending anyway; a stray job is harmless
                pass
        raise
    finally:
        if owned:
            client.close()


def _collect(
    client: Client,
    pending: dict[str, list[Example]],
    settings: Settings,
    check: Check,
    progress: Progress,
    total: int,
) -> dict[str, str]:
    texts: dict[str, str] = {}
    deadline = time.monotonic() + settings.auto_caption_timeout_s
    for caption_id, chunk in pending.items():
        while True:
            check()
            if time.monotonic() > deadline:
                raise ModelError(
                    f"auto_caption: caption job {caption_id} did not finish within "
                    f"{settings.auto_caption_timeout_s:g} s; is a caption worker running?"
                )
            try:
                record = client.wait(caption_id, timeout_s=_WAIT_SLICE_S)
                break
            except JobTimeout:
                continue
        if record.status != "succeeded":
            names = ", ".join(e.file_name for e in chunk)
            error = record.error.message if record.error else record.status
            raise ModelError(f"auto_caption: captioning {names} failed: {error}")
        captions: list[dict[str, Any]] = (record.output or {}).get("captions", [])
        for example, caption in zip(chunk, captions, strict=True):
            text = str(caption.get("text") or "").strip()
            if not text:
                raise ModelError(f"auto_caption: {example.file_name}: the caption came back empty")
            texts[example.file_name] = text
        progress(len(texts), total)
    return texts
