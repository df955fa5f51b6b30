"""The whole Redis key schema of imageq, in one place.

Every key is ``imageq:{IMAGEQ_QUEUE_PREFIX}`` and then the parts below, joined by ``:``,
so deployments that share one Redis keep apart. A job's keys live as long as its record
(``IMAGEQ_RESULT_TTL_S``, 7 days) unless said otherwise; each bounded set says its bound.
``docs/operations.md`` lists them for operators.

=================================  =======  ===============================================
key                                type     holds
=================================  =======  ===============================================
``job:{id}``                       string   the job's record (JSON, ``JobRecord``)
``doc:{id}``                       string   the job's document, as a re-send sends it again
``fingerprint:{id}``               string   hash of an idempotent job's document
``cancel:{id}``                    string   a cancel was asked for
``lease:{id}``                     string   the token of the run holding the job (lease TTL)
``once:{id}``                      hash     once-only side effects done (result.json, the
                                            final webhook, counted, usage, stale mark)
``transient:{id}``                 string   transient retries so far
``resent:{id}``                    string   failover re-sends so far
``updates:{id}``                   channel  the record, on every change
``cancels``                        channel  job ids canceled (every worker listens)
``jobs``                           zset     every job id by creation time (pruned past TTL)
``tenant:{tenant}:jobs``           zset     one gateway tenant's job ids by creation time
``running``                        zset     jobs some run holds, by when to look again
``worker:{name}``                  string   a live worker's heartbeat (seconds)
``workers``                        zset     live worker names by heartbeat expiry
``wh:{webhook id}:done``           string   a delivery's outcome (delivered once)
``wh:{webhook id}:lock``           string   a delivery in progress
``wh:due``                         zset     scheduled webhook retries by due time
``wh:kept``                        hash     deliveries that failed for good, by webhook id
``wh:kept:index``                  zset     their ids by time kept (bounded, see settings)
``error:{error id}``               string   an internal error's detail (operators only)
``id-secret``                      string   the secret tenant job ids are keyed with, when
                                            IMAGEQ_ID_SECRET is unset (no expiry)
``adapters``                       hash     the adapter registry: field -> entry (JSON)
``usage:{tenant}:{day}``           hash     ``{kind}.jobs``, ``{kind}.model_s`` (400 days)
``usage-tenants``                  set      tenants with usage
``gw:token:{sha256}``              string   a gateway token's tenant (no expiry)
``gw:tenant-tokens:{tenant}``      set      a tenant's token digests
``gw:tenants``                     set      tenant names
``gw:tenant:{tenant}``             hash     a tenant's limits and grants
``gw:rate:{what}:{tenant}``        hash     a tenant's rate bucket (seconds)
``gw:inflight:{tenant}``           zset     a tenant's jobs in flight
``gw:hub``                         channel  the gateway replicas' update hub
=================================  =======  ===============================================
"""

from __future__ import annotations


class Keys:
    """The keys of one deployment (its namespace: ``imageq:{IMAGEQ_QUEUE_PREFIX}``)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def _key(self, *parts: str) -> str:
        return self.namespace + ":".join(parts)

    # -- one job ---------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def doc(self, job_id: str) -> str:
        return self._key("doc", job_id)

    def fingerprint(self, job_id: str) -> str:
        return self._key("fingerprint", job_id)

    def cancel(self, job_id: str) -> str:
        return self._key("cancel", job_id)

    def lease(self, job_id: str) -> str:
        return self._key("lease", job_id)

    def once(self, job_id: str) -> str:
        return self._key("once", job_id)

    def transient(self, job_id: str) -> str:
        return self._key("transient", job_id)

    def resent(self, job_id: str) -> str:
        return self._key("resent", job_id)

    def updates(self, job_id: str) -> str:
        """The job's pub/sub channel."""
        return self._key("updates", job_id)

    # -- every job ---------------------------------------------------------------------------
    def cancels(self) -> str:
        """The channel every cancel is published on."""
        return self._key("cancels")

    def jobs(self) -> str:
        return self._key("jobs")

    def tenant_jobs(self, tenant: str) -> str:
        return self._key("tenant", tenant, "jobs")

    def running(self) -> str:
        return self._key("running")

    # -- workers -----------------------------------------------------------------------------
    def worker(self, name: str) -> str:
        return self._key("worker", name)

    def workers(self) -> str:
        return self._key("workers")

    # -- webhooks ----------------------------------------------------------------------------
    def webhook_done(self, webhook_id: str) -> str:
        return self._key("wh", webhook_id, "done")

    def webhook_lock(self, webhook_id: str) -> str:
        return self._key("wh", webhook_id, "lock")

    def webhook_due(self) -> str:
        return self._key("wh", "due")

    def webhooks_kept(self) -> str:
        return self._key("wh", "kept")

    def webhooks_kept_index(self) -> str:
        return self._key("wh", "kept", "index")

    # -- errors and ids ------------------------------------------------------------------------
    def error(self, error_id: str) -> str:
        return self._key("error", error_id)

    def id_secret(self) -> str:
        return self._key("id-secret")

    # -- adapters and usage -------------------------------------------------------------------
    def adapters(self) -> str:
        return self._key("adapters")

    def usage(self, tenant: str, day: str) -> str:
        return self._key("usage", tenant, day)

    def usage_tenants(self) -> str:
        return self._key("usage-tenants")

    # -- the gateway --------------------------------------------------------------------------
    def gateway_token(self, digest: str) -> str:
        return self._key("gw", "token", digest)

    def gateway_tenant_tokens(self, tenant: str) -> str:
        return self._key("gw", "tenant-tokens", tenant)

    def gateway_tenants(self) -> str:
        return self._key("gw", "tenants")

    def gateway_tenant(self, tenant: str) -> str:
        return self._key("gw", "tenant", tenant)

    def gateway_rate(self, what: str, tenant: str) -> str:
        return self._key("gw", "rate", what, tenant)

    def gateway_in_flight(self, tenant: str) -> str:
        return self._key("gw", "inflight", tenant)

    def gateway_hub(self) -> str:
        return self._key("gw", "hub")
