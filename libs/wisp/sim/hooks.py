"""The few service decisions the simulator must take exactly as the services take them.

The policies themselves (``SchedulerCore``, ``FcfsPolicy``, ``SloAwarePolicy``,
``AdmissionController``, ``DraftLengthPolicy`` objects, ``SessionSpecStats``) are imported from
``wisp.policy`` and used as they are. What lives in ``services/`` is injected: ``libs/`` must
never import ``services/``, so ``wisp-cli sim`` (``services/cli_sim.py``) passes the services'
own ``round_deadline`` (scheduler), ``expected_commit`` (drafter) and ``default_policy``
(scheduler) through ``ServiceHooks``. The mirrors below are the fallback for library use and
are tested equal to the services' functions (``tests/unit/test_sim_identity.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wisp.policy.controller import DraftLengthPolicy, FixedLength
from wisp.policy.scheduler import BatchPolicy, FcfsPolicy
from wisp.settings import Mode, Settings


def mirror_round_deadline(b: Any) -> float:
    """Mirror of ``services.scheduler.service.round_deadline`` (the same ``deadline_at``)."""
    from wisp.policy.slo import deadline_at

    return deadline_at(b.generated_len, b.request_ts, b.ttft_slo_ms, b.tpot_slo_ms,
                       getattr(b, "first_token_ts", None))


def mirror_expected_commit(features: Sequence[Any]) -> float:
    """Mirror of ``services.drafter.service.expected_commit``."""
    total, alive = 1.0, 1.0
    for f in features:
        alive *= min(max(f.top1_prob, 0.0), 1.0)
        total += alive
    return total


def mirror_scheduler_policy(s: Settings) -> BatchPolicy:
    """Mirror of ``services.scheduler.service.default_policy``."""
    if s.mode == Mode.wisp:
        from wisp.policy.slo import SloAwarePolicy

        return SloAwarePolicy(max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms)
    return FcfsPolicy(s.max_batch_size, s.max_wait_ms)


def service_draft_policy(s: Settings) -> tuple[DraftLengthPolicy, str]:
    """The drafter's policy for mode ``s.mode``: centralized never drafts; otherwise the
    drafter's own ``wisp.policy.controller.default_policy(settings)`` (in wisp mode the shipped
    learned controller), or ``FixedLength(draft_k)`` where that function does not exist yet.
    Returns the policy and a note saying which one it is."""
    if s.mode == Mode.centralized:
        return FixedLength(0), "FixedLength(0) (centralized)"
    from wisp.policy import controller

    fn = getattr(controller, "default_policy", None)
    if fn is None:
        note = f"FixedLength({s.draft_k}) (no default_policy in wisp.policy.controller)"
        return FixedLength(s.draft_k), note
    pol = fn(s)
    return pol, f"{type(pol).__name__} via wisp.policy.controller.default_policy"


@dataclass(frozen=True)
class ServiceHooks:
    round_deadline: Callable[[Any], float] = mirror_round_deadline
    expected_commit: Callable[[Sequence[Any]], float] = mirror_expected_commit
    scheduler_policy: Callable[[Settings], BatchPolicy] = mirror_scheduler_policy
    draft_policy: Callable[[Settings], tuple[DraftLengthPolicy, str]] = service_draft_policy
    source: str = "mirror"
    """'services' when the functions are the services' own (wisp-cli sim), 'mirror' otherwise."""


DEFAULT_HOOKS = ServiceHooks()


class BlockView:
    """The fields of a ``DraftBlock`` that ``round_deadline`` reads (a plain object, so the
    simulator does not build a pydantic message per round)."""

    __slots__ = ("first_token_ts", "generated_len", "request_ts", "ttft_slo_ms", "tpot_slo_ms")

    def __init__(self, generated_len: int, request_ts: float, ttft_slo_ms: float, tpot_slo_ms: float,
                 first_token_ts: float | None = None) -> None:
        self.generated_len = generated_len
        self.request_ts = request_ts
        self.ttft_slo_ms = ttft_slo_ms
        self.tpot_slo_ms = tpot_slo_ms
        self.first_token_ts = first_token_ts
