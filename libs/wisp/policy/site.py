"""Where a session's next tokens are made: drafted on the device and verified, or decoded by the
server in its continuous batch.

Speculation is not always the better choice. A slow device whose round trip plus drafting takes
longer than the server's own decode step, a pair that agrees on few tokens, or a server that is
compute-bound (every drafted token it verifies and rejects is compute it could have spent
decoding) all make server-side decoding the better deal for that session; a fast device with a
well-matched draft on a memory-bound server makes drafting far better. ``SiteChooser`` decides
per round, from what is measured:

* the device: its draft time per token (``SpecSession``'s EMA) and its round trip (an EMA of the
  time a round spends outside the verifier: network and queues), and the session's per-token
  acceptance (``LinkEstimate``: an EMA of accepted tokens over judged ones);
* the server (``ServerCosts``, what the scheduler publishes): the time of one batched forward at
  the current load, the marginal verify cost of one more row and of one more fed token, and
  whether KV memory or compute is the limit.

For a cap of ``k`` drafted tokens with per-token acceptance ``a`` a round commits on average
``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens (the accepted run plus the target's own). Per committed
token it then takes

    latency  L(k) = (k * draft_ms + rtt_ms + step_ms + row_ms + token_ms * (k + 1)) / E(k)
    server   S(k) = (row_ms + token_ms * (k + 1)) / E(k)

and server-side decoding (one token per forward, streamed, no round trip per token)

    latency  L_srv = step_ms + row_ms + token_ms,      server  S_srv = row_ms + token_ms.

Among the choices whose latency meets the session's TPOT SLO (all of them if none does, then the
fastest wins): when the server is compute-bound, the least server time per committed token
(that is what limits how many sessions it serves); otherwise, KV-bound or with headroom, the
least latency per committed token (a session holds its KV for as long as it takes, so the
KV-seconds it costs per token are its latency per token times its footprint). A choice must beat
the session's current site by ``hysteresis`` to switch it, so a session does not flap between
sites on noise. Pure and deterministic; time is never read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ACCEPT_ALPHA = 0.3
"""Weight of the newest round in the round-trip EMA."""
ACCEPT_DECAY = 0.8
"""Per round, earlier rounds' accepted and judged counts decay by this (a window of about five
rounds)."""
PRIOR_WEIGHT = 2.0
"""Pseudo-judged drafts at the prior acceptance: one early rejection must not read as an
acceptance of 0 (which would send a good session to the server for good)."""


def expected_commit_geometric(acceptance: float, k: int) -> float:
    """Tokens a round with a cap of ``k`` drafts commits on average when each draft is accepted
    with probability ``acceptance`` independently, until the first rejection (plus the
    target's own token)."""
    a = min(max(acceptance, 0.0), 1.0)
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class ServerCosts:
    """What a round costs the server at its current load (the scheduler's published state)."""

    step_ms: float
    """One batched forward at the current load: what a server-decoded token waits for."""
    row_ms: float
    """Marginal verify time of one more row in that forward."""
    token_ms: float
    """Marginal verify time of one more fed token."""
    compute_bound: bool = False
    """The verifiers are busy AND their forwards are compute-limited (the fed tokens' marginal
    cost is a large share of a forward): server time per committed token limits capacity. A
    busy but memory-bound verifier (extra rows nearly free) is not: there, latency decides."""
    kv_bound: bool = False
    """KV memory is the limit (sessions wait for it)."""


@dataclass
class LinkEstimate:
    """Per session: the measured round trip (an EMA) and per-token acceptance (decayed counts
    of accepted and judged drafts, shrunk toward a prior). The device's draft speed comes from
    ``SpecSession`` (``stats.draft_ms_per_token``). The round trip also feeds the speculation
    controller's goodput rule in every wisp round (``SpecSession.plan``), whatever the site
    choice."""

    rtt_ms: float | None = None
    accepted: float = 0.0
    judged: float = 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.judged if self.judged > 0 else None

    def acceptance_with_prior(self, prior: float) -> float:
        return (self.accepted + PRIOR_WEIGHT * prior) / (self.judged + PRIOR_WEIGHT)

    def observe_round(self, drafted: int, accepted: int, outside_ms: float | None) -> None:
        """A verdict: ``accepted`` of ``drafted`` drafts (judged: the accepted ones plus the
        rejected one, if any); ``outside_ms``: the round's time outside the verifier (network,
        queues), None when unknown (a server-decoded token has none)."""
        if drafted > 0:
            judged = accepted + (1 if accepted < drafted else 0)
            self.accepted = ACCEPT_DECAY * self.accepted + accepted
            self.judged = ACCEPT_DECAY * self.judged + judged
        if outside_ms is not None and math.isfinite(outside_ms) and outside_ms >= 0:
            old = self.rtt_ms
            self.rtt_ms = outside_ms if old is None else (1 - ACCEPT_ALPHA) * old + ACCEPT_ALPHA * outside_ms


@dataclass(frozen=True)
class SiteChoice:
    server_decode: bool
    k: int
    """The draft cap when drafting (the controller's own stop rule may stop earlier)."""
    latency_ms_per_token: float
    server_ms_per_token: float
    reason: str


@dataclass
class SiteState:
    """Where one session's rounds are made now: drafted on its device, or in a server run."""

    on_server: bool = False
    server_tokens: int = 0
    """Tokens the server made in the current run."""


@dataclass
class SiteChooser:
    """Drafting with a cap of ``k`` (1..``max_k``) or server-side decoding, per round (module
    doc). Until a session has measurements (its first rounds) it drafts with ``max_k``, the
    speculative default, and the prior ``default_acceptance`` stands in for its own."""

    max_k: int = 8
    hysteresis: float = 0.1
    default_acceptance: float = 0.7
    """The prior a session's own acceptance is shrunk toward."""
    default_rtt_ms: float = 60.0
    probe_every: int = 32
    """A session the server decodes drafts one round after this many server-decoded tokens, so
    its figures are measured again (a device that never drafts cannot show that it improved)."""

    def next_round(self, state: SiteState, *, draft_ms: float | None, link: LinkEstimate,
                   server: ServerCosts | None, tpot_slo_ms: float) -> SiteChoice:
        """The site of a session's next round, the one rule the drafter service and the
        simulator both follow. A session in a server run stays there until the run has made
        ``probe_every`` tokens (nothing the choice reads about the device changes meanwhile);
        then it drafts one probe round at ``max_k``, so its draft speed, round trip and
        acceptance are measured again and a device whose figures improved comes back;
        otherwise ``choose``. Updates ``state``; the caller counts the run's tokens
        (``server_tokens``)."""
        if state.on_server:
            if state.server_tokens < self.probe_every:
                return SiteChoice(True, 0, math.nan, math.nan, "server run")
            state.on_server, state.server_tokens = False, 0
            return SiteChoice(False, self.max_k, math.nan, math.nan, "probe: measure the device again")
        choice = self.choose(draft_ms=draft_ms, link=link, server=server, tpot_slo_ms=tpot_slo_ms)
        if choice.server_decode:
            state.on_server, state.server_tokens = True, 0
        return choice

    def run_left(self, state: SiteState) -> int:
        """Tokens the session's server run still makes (0: not in one, or it is over)."""
        return max(0, self.probe_every - state.server_tokens) if state.on_server else 0

    def options(self, draft_ms: float, rtt_ms: float, acceptance: float,
                server: ServerCosts) -> list[SiteChoice]:
        """Every choice with its latency and server time per committed token (server decode
        first, then k = 1..max_k)."""
        lat = server.step_ms + server.row_ms + server.token_ms
        out = [SiteChoice(True, 0, lat, server.row_ms + server.token_ms, "server decode")]
        for k in range(1, self.max_k + 1):
            e = expected_commit_geometric(acceptance, k)
            srv = server.row_ms + server.token_ms * (k + 1)
            latency = (k * draft_ms + rtt_ms + server.step_ms + srv) / e
            out.append(SiteChoice(False, k, latency, srv / e, f"draft k={k}"))
        return out

    def choose(self, *, draft_ms: float | None, link: LinkEstimate, server: ServerCosts | None,
               tpot_slo_ms: float, currently_server: bool = False,
               tokens_on_server: int = 0) -> SiteChoice:
        if server is None or draft_ms is None:  # nothing measured yet: speculate, as a drafter does
            return SiteChoice(False, self.max_k, math.nan, math.nan, "no measurements yet")
        if currently_server and tokens_on_server >= self.probe_every:
            return SiteChoice(False, self.max_k, math.nan, math.nan, "probe: measure the device again")
        acc = link.acceptance_with_prior(self.default_acceptance)
        rtt = link.rtt_ms if link.rtt_ms is not None else self.default_rtt_ms
        opts = self.options(draft_ms, rtt, acc, server)
        feasible = [o for o in opts if o.latency_ms_per_token <= tpot_slo_ms] or \
            [min(opts, key=lambda o: o.latency_ms_per_token)]
        if server.compute_bound and not server.kv_bound:
            def cost(o: SiteChoice) -> float:
                return o.server_ms_per_token
            why = "compute-bound: least server time per token"
        else:
            def cost(o: SiteChoice) -> float:
                return o.latency_ms_per_token
            why = "KV-bound: least KV-seconds per token" if server.kv_bound else "least latency per token"
        best = min(feasible, key=lambda o: (round(cost(o), 6), o.latency_ms_per_token))
        current = next((o for o in feasible if o.server_decode), None) if currently_server else \
            min((o for o in feasible if not o.server_decode), key=cost, default=None)
        if current is not None and best.server_decode != current.server_decode \
                and cost(best) > cost(current) * (1.0 - self.hysteresis):
            best = current  # not better by enough to move the session
        return SiteChoice(best.server_decode, best.k, best.latency_ms_per_token,
                          best.server_ms_per_token, f"{best.reason} ({why})")


@dataclass
class CostTracker:
    """What the scheduler publishes about the server's costs (``ServerCosts``), from what it
    observes: each finished forward's measured time and shape. The scheduler service feeds it
    every ``TimingSample``; the simulator every simulated forward. ``costs(now, ...)`` closes the
    period since the previous call: its busy share, the EMA of forward times, and the
    estimator's marginal cost of one more row and one more fed token on the last forward's
    shape (what one more session would add to the next forward)."""

    alpha: float = 0.2
    busy_threshold: float = 0.9
    compute_share: float = 0.5
    """A forward is compute-limited when the marginal cost of what it fed (its rows and tokens)
    is over this share of its time; a memory-bound forward costs its weight reads whatever
    rides along."""
    step_ms: float | None = None
    last_new: tuple[int, ...] = ()
    last_ctx: tuple[int, ...] = ()
    busy_ms: float = 0.0
    since: float | None = None

    def observe(self, new_tokens: Sequence[int], context_lens: Sequence[int], measured_ms: float) -> None:
        if not math.isfinite(measured_ms) or measured_ms <= 0 or not new_tokens:
            return
        self.step_ms = measured_ms if self.step_ms is None else (
            (1 - self.alpha) * self.step_ms + self.alpha * measured_ms)
        self.last_new, self.last_ctx = tuple(new_tokens), tuple(context_lens)
        self.busy_ms += measured_ms

    def costs(self, now: float, predict: Callable[[Sequence[int], Sequence[int]], float], *,
              verifiers: int = 1, kv_bound: bool = False) -> ServerCosts | None:
        """The published figures for the period ending ``now`` (None before any forward).
        ``predict(new, ctx)``: the estimator's batch time."""
        period_ms = (now - self.since) * 1000.0 if self.since is not None else 0.0
        busy = self.busy_ms / (period_ms * max(verifiers, 1)) if period_ms > 0 else 0.0
        self.since, self.busy_ms = now, 0.0
        if self.step_ms is None:
            return None
        new, ctx = list(self.last_new), list(self.last_ctx)
        avg = int(sum(ctx) / len(ctx)) if ctx else 0
        base = predict(new, ctx)
        one = predict([*new, 1], [*ctx, avg])
        two = predict([*new, 2], [*ctx, avg])
        token_ms = max(0.0, two - one)
        row_ms = max(0.0, one - base - token_ms)
        marginal = token_ms * sum(new) + row_ms * len(new)
        return ServerCosts(step_ms=self.step_ms, row_ms=row_ms, token_ms=token_ms,
                           compute_bound=busy > self.busy_threshold
                           and marginal > self.compute_share * self.step_ms,
                           kv_bound=kv_bound)
