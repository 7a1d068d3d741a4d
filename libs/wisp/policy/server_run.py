"""Server runs: sessions a verifier decodes by itself, step after step, in its continuous batch.

Why: centralized serving used to send every token through the four services (drafter ->
estimator -> scheduler -> verifier -> drafter): one round trip per token, and at most one round
per session in each batch the scheduler formed. A vLLM-class server keeps a decoding sequence in
its running batch and makes its next token at every forward. A server run is that path: an
undrafted round whose block asks for ``server_rounds`` more rounds makes the verifier keep the
session resident; each forward the verifier runs (a batch from the scheduler, or a step of its
own when none is waiting) makes one more token for every resident session. Its tokens go back
as verdicts, each carrying every token made since the previous one, sent at most ``emit_s``
apart (``server_run_emit_ms``, 200 ms; a slow target sends every token at once), with the number
of tokens the server will still make. The drafter waits for those instead of publishing rounds.
(A verdict per token was measured first: with the tiny pair at 36 devices the verifier made
tokens faster than one drafter process could save and stream them one by one.)

Each step samples the target's own distribution at its position (greedy: the argmax) with a
sampler seeded by the request's seed and the committed prefix (``round_generator(..., "decode")``,
the key an undrafted round uses too), so a run re-started from any point after a failover draws
the same tokens: greedy output is unchanged, sampled output is distributed as the target's.

A run ends at its last round, at an end-of-sequence token, when its session is cancelled, when
a new round for the session arrives (a drafter that re-sent or re-planned it after a failover: the
new block wins), or when the verifier stops (its last verdict says 0 rounds left, so the drafter
plans the next round and another verifier takes it). Plain bookkeeping, no torch, no Redis: the
verifier service moves the messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from wisp.prefix import PrefixDigest

MAX_CHUNK = 256
"""Most tokens one verdict carries (the protocol's bound)."""
EMIT_S = 0.05
"""Longest a made token waits before it is sent (the default of ``ServerRuns.emit_s``)."""
RIDE_MAX_NEW = 16
"""Longest row (new ids) of a scheduler batch the runs' steps ride along with (``rides_along``)."""


def rides_along(new_ids: Sequence[int], limit: int = RIDE_MAX_NEW) -> bool:
    """Whether the runs' steps (one new id each) go in the same forward as a scheduler batch
    whose rows feed ``new_ids`` uncached ids each, or wait for the next forward of their own.

    Why: the verifier's engine pads every row of a forward to the longest one. A batch that
    holds a prefill (a session's first round, or one re-sent to a verifier without its cache)
    would make each of the runs' one-token rows as long as the prompt: measured with the tiny
    pair at 36 devices, every step of 36 runs then cost a prefill of each, and first rounds
    (the prefills) waited for the runs instead. Short rows (speculative rounds, up to
    ``limit`` ids) cost about what a decode row costs, so those batches take the runs along."""
    return not new_ids or max(new_ids) <= limit


@dataclass
class ServerRun:
    """One resident session: what its next step builds on, what is made but not sent yet."""

    request_id: str
    device: str
    """The drafter that gets the verdicts."""
    committed: list[int]
    """Prompt + generated ids the next step builds on (sent and unsent)."""
    round: int
    """The round number of its next verdict."""
    left: int
    """Tokens still to make."""
    temperature: float
    seed: int | None
    base: int = 0
    """Committed ids the next verdict builds on (what the drafter has)."""
    pending: list[int] = field(default_factory=list)
    """Made, not sent yet."""
    emitted_at: float = 0.0
    digest: PrefixDigest = field(default_factory=PrefixDigest)
    """``digest_ids(committed)``, kept up to date a token at a time (it keys the step's sampler)."""


@dataclass(frozen=True)
class Emission:
    """A verdict to send for a run: ``tokens`` made after ``base`` committed ids, as round
    ``round``; ``left`` tokens the server will still make (0: the drafter plans what follows)."""

    request_id: str
    device: str
    round: int
    base: int
    tokens: tuple[int, ...]
    left: int


class ServerRuns:
    """The server runs one verifier holds (at most ``limit``: its KV sessions)."""

    def __init__(self, limit: int, eos: frozenset[int] = frozenset(), emit_s: float = EMIT_S) -> None:
        self.limit = limit
        self.eos = eos
        self.emit_s = emit_s
        self._runs: dict[str, ServerRun] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._runs

    def due(self) -> list[ServerRun]:
        """Every resident run: each makes one token at the next forward."""
        return list(self._runs.values())

    def drop(self, request_id: str) -> bool:
        """End a run (its session was cancelled, or a new round for it arrived); its unsent
        tokens go with it. True if one was held."""
        return self._runs.pop(request_id, None) is not None

    def start(self, *, request_id: str, device: str, committed: list[int], round: int,
              server_rounds: int, token: int, temperature: float, seed: int | None,
              now: float) -> int:
        """The first round of a run (``round``, built on ``committed``) made ``token`` (sent
        as that round's verdict): keep the session resident to make up to ``server_rounds``
        more tokens. Returns the tokens left (0: no run, the drafter plans the next round: none
        was asked, the token ended the sequence, or the verifier holds ``limit`` runs)."""
        self._runs.pop(request_id, None)
        if server_rounds <= 0 or token in self.eos or len(self._runs) >= self.limit:
            return 0
        ids = [*committed, token]
        self._runs[request_id] = ServerRun(request_id, device, ids, round + 1, server_rounds,
                                           temperature, seed, base=len(ids), emitted_at=now,
                                           digest=PrefixDigest(ids))
        return server_rounds

    def advance(self, run: ServerRun, token: int, now: float, *, last: bool = False) -> Emission | None:
        """``run``'s step made ``token``: the verdict to send now (its tokens made since the
        last one), or None while the tokens wait (at most ``emit_s``). The run ends, with a
        verdict saying 0 left, at its last token, an EOS, or ``last`` (the verifier stops and
        gives it back). A run dropped while its step was computed (cancel, superseded) sends
        nothing."""
        if self._runs.get(run.request_id) is not run:
            return None
        run.committed = [*run.committed, token]
        run.digest.extend((token,))
        run.pending.append(token)
        run.left -= 1
        done = last or run.left <= 0 or token in self.eos
        if not done and now - run.emitted_at < self.emit_s and len(run.pending) < MAX_CHUNK:
            return None
        em = Emission(run.request_id, run.device, run.round, run.base, tuple(run.pending),
                      0 if done else run.left)
        run.round += 1
        run.base, run.pending, run.emitted_at = len(run.committed), [], now
        if done:
            del self._runs[run.request_id]
        return em
