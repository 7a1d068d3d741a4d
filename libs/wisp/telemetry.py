"""Prometheus metrics of every service, named as in docs/deploy.md (the ``spec_decode`` family
follows vLLM's names). Defined once here; services only increment/observe them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_MS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

STREAM_LAG = Gauge("wisp_stream_lag", "Entries of a stream its consumer group has not read yet",
                   ["stream", "group"])
STREAM_PENDING = Gauge("wisp_stream_pending", "Entries delivered to a group but not acked yet",
                       ["stream", "group"])
STREAM_PENDING_AGE = Gauge("wisp_stream_pending_oldest_seconds",
                           "Age of the oldest entry delivered to a group and not acked yet, from "
                           "its stream id (0: none pending)", ["stream", "group"])
BATCH_SIZE = Histogram("wisp_batch_size", "Rounds per verification batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
VERIFY_SECONDS = Histogram("wisp_verify_seconds", "Wall time of one batch verification",
                           buckets=_MS_BUCKETS)
ESTIMATOR_ERROR = Histogram("wisp_estimator_abs_pct_error",
                            "|predicted - measured| / measured verify time per batch",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
NUM_DRAFTS = Counter("wisp_spec_decode_num_drafts", "Verified rounds (draft blocks)")
NUM_DRAFT_TOKENS = Counter("wisp_spec_decode_num_draft_tokens", "Drafted tokens verified")
NUM_ACCEPTED = Counter("wisp_spec_decode_num_accepted_tokens", "Drafted tokens accepted")
ACCEPTED_PER_POS = Counter("wisp_spec_decode_num_accepted_tokens_per_pos",
                           "Accepted drafted tokens by position in the draft", ["position"])
TTFT_SECONDS = Histogram("wisp_ttft_seconds", "Time to first committed token per request",
                         buckets=_MS_BUCKETS)
TPOT_SECONDS = Histogram("wisp_tpot_seconds", "Mean time per output token after the first",
                         buckets=_MS_BUCKETS)
REQUESTS_FINISHED = Counter("wisp_requests_finished", "Finished requests")
SLO_ATTAINED = Counter("wisp_slo_attained", "Finished requests that met TTFT and TPOT SLOs")
REQUESTS_REFUSED = Counter("wisp_requests_refused", "Requests refused with an error event",
                           ["reason"])
DEAD_LETTERS = Counter("wisp_dead_letters", "Messages sent to the dead-letter stream", ["reason"])


def reason_label(reason: str) -> str:
    """A low-cardinality label for a dead-letter reason (the full text is in wisp:dead)."""
    r = reason.lower()
    for key in ("version", "missing", "undecodable", "exceeds", "deliver", "vocabulary",
                "distribution", "invalid"):
        if key in r:
            return {"exceeds": "oversized", "deliver": "too-many-deliveries",
                    "vocabulary": "bad-token", "distribution": "bad-distribution"}.get(key, key)
    return "other"
