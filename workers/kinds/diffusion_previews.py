"""One diffusion job's step previews: throttled, decoded and stored off the pipeline thread.

The pipeline's step callback asks ``due()`` and hands over a CPU copy of the job's
latents (``imageq.workers.predictors.previews.offer_previews``); a small executor shared by
the worker's jobs decodes, encodes and stores it, then records it in the job's progress
(``JobControl.preview``: ``progress.preview``, the gateway's ``preview`` event, the
``job.preview`` webhook). A preview never fails its job: a storage error skips it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from imageq.api_client.object_urls import PREVIEW_FILE
from imageq.workers.predictors.previews import PREVIEW_MEDIA_TYPE, PreviewDecoder, preview_jpeg

log = logging.getLogger(__name__)

#: Stores a preview's bytes; returns its ``{"uri", "url"?}``.
Store = Callable[[bytes], dict[str, Any]]
#: Records a stored preview (``JobControl.preview``).
Publish = Callable[[dict[str, Any]], None]

#: How long a job that ends waits for its preview in flight (a decode plus one storage
#: write: ~20 ms measured locally), so that no preview lands after the final record.
CLOSE_WAIT_S = 5.0


class PreviewPublisher:
    """A ``PreviewSink`` for one job: at most one preview in flight, and the next one
    only ``interval_s`` after the last was published (published, not offered: so two
    published previews are never closer than the interval, however long a store takes).
    """

    def __init__(
        self,
        decoder: PreviewDecoder,
        executor: Executor,
        store: Store,
        publish: Publish,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.decoder = decoder
        self.executor = executor
        self.store = store
        self.publish = publish
        self.interval_s = interval_s
        self.clock = clock
        self.published = 0
        self._last = -math.inf
        self._busy = False
        self._closed = False
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def due(self) -> bool:
        with self._lock:
            return self._ready()

    def _ready(self) -> bool:
        return not self._closed and not self._busy and self.clock() - self._last >= self.interval_s

    def offer(self, step: int, total: int, latents: Any) -> None:
        with self._lock:
            if not self._ready():
                return
            self._busy = True
            self._idle.clear()
        try:
            self.executor.submit(self._run, step, total, latents)
        except RuntimeError:  # the executor was shut down: the worker is stopping
            self._done()

    def _run(self, step: int, total: int, latents: Any) -> None:
        try:
            image = self.decoder.decode(latents)
            data = preview_jpeg(image, (int(latents.shape[-1]), int(latents.shape[-2])))
            with self._lock:
                if self._closed:
                    return
            ref = self.store(data)
            self.publish({**ref, "step": step, "total": total, "media_type": PREVIEW_MEDIA_TYPE})
            self.published += 1
        except Exception as exc:
            log.warning("%s of step %d not published: %s", PREVIEW_FILE, step, exc)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._busy = False
            self._last = self.clock()
            self._idle.set()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """No more previews; wait for the one in flight (its record write comes first)."""
        self._idle.wait(wait_s)
        with self._lock:
            self._closed = True
