"""One S3 PUT without botocore's request pipeline: a presigned URL and one HTTP request.

boto3's ``put_object`` costs a worker 1.5-1.8 ms of CPU (event hooks, parameter
validation, checksums, serialisation, signing, the retry handler, response parsing):
for a caption job, as much as the rest of its bookkeeping, and every job writes
``result.json``. Here botocore itself signs a presigned PUT URL (the client's
credentials, region, endpoint and addressing style: nothing is re-implemented) and the
request goes out on the client's own connection pool (its proxies, CA bundle and pool
size), with a ``Content-MD5`` that S3 checks: about half the CPU.

It only ever saves time. Anything but a 2xx answer, or an exception, and the caller
makes the ordinary ``put_object`` call, with botocore's retries and imageq's error
mapping: a PUT that failed here is retried there, and a PUT is idempotent. A server that
refuses presigned PUTs (a 4xx) turns this off for the process, with one warning.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

# Long enough for a slow upload to start; the URL never leaves this process.
_URL_TTL_S = 300


class LightPut:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.enabled = True

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> bool:
        """True when the object is stored; False: make the ordinary call."""
        if not self.enabled:
            return False
        try:
            url = self.client.generate_presigned_url(
                "put_object",
                Params={"Bucket": bucket, "Key": key, "ContentType": content_type},
                ExpiresIn=_URL_TTL_S,
            )
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            request = AWSRequest(
                method="PUT",
                url=url,
                data=data,
                headers={"Content-Type": content_type, "Content-MD5": md5},
            ).prepare()
            # The client's own HTTP session (botocore has no public handle on it).
            response = self.client._endpoint.http_session.send(request)
        except Exception as exc:  # the ordinary call retries and reports it
            log.debug("light PUT of %s failed: %s", key, exc)
            return False
        status = int(response.status_code)
        if 200 <= status < 300:
            return True
        if 400 <= status < 500 and status not in (408, 429):
            self.enabled = False
            log.warning(
                "storage answered a presigned PUT with %d; using put_object from now on", status
            )
        return False
