"""The HTTP gateway (``imageq gateway``): jobs over HTTPS with a token per tenant.

A stateless ASGI service in front of the same queues and records as every other
producer: it submits through ``imageq.api_client.client.Client``, so it never imports Celery's
worker side, torch or ``tasks``. docs/design.md "HTTP gateway" is its contract.
"""
