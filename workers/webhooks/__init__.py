"""Webhook delivery: ``outbox`` schedules and retries events, ``post`` makes one signed attempt."""
