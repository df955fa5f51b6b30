from __future__ import annotations

from imageq.api_client.redact import redact_document, redact_ref
from imageq.api_client.settings import Settings


def test_settings_from_env_parse_types_and_units() -> None:
    s = Settings.from_env(
        {
            "IMAGEQ_BROKER_URL": "redis://:pw@h:1/2",
            "IMAGEQ_ALLOW_PRIVATE_URLS": "true",
            "IMAGEQ_MAX_BATCH_WAIT_MS": "25",
            "IMAGEQ_LEASE_TTL_S": "2.5",
            "IMAGEQ_WEBHOOK_SCHEDULE_S": "0, 1.5,3",
            "IMAGEQ_WEBHOOK_SECRET": "whsec_abc",
        }
    )
    assert s.allow_private_urls is True
    assert s.max_batch_wait_ms == 25 and s.lease_ttl_s == 2.5
    assert s.webhook_schedule_s == (0.0, 1.5, 3.0)
    view = s.public_view()
    assert view["webhook_secret"] == "***" and "pw" not in view["broker_url"]
    assert Settings.from_env({}).storage_url == "file://~/imageq-data"


def test_inline_images_and_url_queries_are_redacted() -> None:
    uri = "data:image/png;base64," + "A" * 5000
    assert len(redact_ref(uri)) < 60
    assert redact_ref("https://h.example/a.png?X-Amz-Signature=secret") == "https://h.example/a.png"
    doc = {"id": "1", "input": {"images": [uri]}, "webhook": {"url": "https://x/y?token=t"}}
    red = redact_document(doc)
    assert "AAAA" not in str(red) and "token" not in str(red)
    assert doc["input"]["images"][0] == uri
