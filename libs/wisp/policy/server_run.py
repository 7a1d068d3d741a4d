"""Server runs: sessions a verifier decodes by itself, step after step, in its continuous batch.

Why: centralized serving used to send every token through the four services (drafter ->
estimator -> scheduler -> verifier -> drafter): one round trip per token, and at most one round
per session in each batch the scheduler formed. A vLLM-class server keeps a decoding sequence in
its running batch and makes its next token at every forward. A server run is that path: an
undrafted round whose block asks for ``server_rounds`` more rounds makes the verifier keep the
session resident; each forward the verifier runs (a batch from the scheduler, or a step of its
own when none is waiting) makes one more token for every resident session, and each token goes
back at once as that round's verdict (so the client's stream is per token), with the number of
rounds the server will still make. The drafter waits for those instead of publishing rounds.

Each step is exactly the undrafted round the drafter would otherwise have sent (same committed
ids, same round number, hence the same seeded sampler), so a run changes where a token is made,
never which token: greedy output and the sampled distribution are unchanged.

A run ends at its last round, at an end-of-sequence token, when its session is cancelled, when
a new round for the session arrives (a drafter that re-sent or re-planned it after a failover: the
new block wins), or when the verifier stops (its last verdict says 0 rounds left, so the drafter
plans the next round and another verifier takes it). Plain bookkeeping, no torch, no Redis: the
verifier service moves the messages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerRun:
    """One resident session: what its next step builds on and which round it makes."""

    request_id: str
    device: str
    """The drafter that gets the verdicts."""
    committed: list[int]
    """Prompt + generated ids the next step builds on."""
    round: int
    """The round the next step makes."""
    last_round: int
    """The run's final round."""
    temperature: float
    seed: int | None

    @property
    def left(self) -> int:
        """Rounds still to make after the next one."""
        return self.last_round - self.round


class ServerRuns:
    """The server runs one verifier holds (at most ``limit``: its KV sessions)."""

    def __init__(self, limit: int, eos: frozenset[int] = frozenset()) -> None:
        self.limit = limit
        self.eos = eos
        self._runs: dict[str, ServerRun] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._runs

    def due(self) -> list[ServerRun]:
        """Every resident run: each makes one token at the next forward."""
        return list(self._runs.values())

    def drop(self, request_id: str) -> bool:
        """End a run (its session was cancelled, or a new round for it arrived). True if one
        was held."""
        return self._runs.pop(request_id, None) is not None

    def start(self, *, request_id: str, device: str, committed: list[int], round: int,
              server_rounds: int, token: int, temperature: float, seed: int | None) -> int:
        """The first round of a run (``round``, built on ``committed``) made ``token``: keep
        the session resident for up to ``server_rounds`` more rounds. Returns the rounds left
        (0: no run, the drafter plans the next round: none was asked, the token ended the
        sequence, or the verifier holds ``limit`` runs already)."""
        self._runs.pop(request_id, None)
        if server_rounds <= 0 or token in self.eos or len(self._runs) >= self.limit:
            return 0
        self._runs[request_id] = ServerRun(request_id, device, [*committed, token], round + 1,
                                           round + server_rounds, temperature, seed)
        return server_rounds

    def advance(self, run: ServerRun, token: int) -> int:
        """``run``'s step made ``token`` (the verdict of round ``run.round``, built on
        ``run.committed``, is being sent): returns the rounds the server will still make (0: the
        run is over and forgotten). A run that was dropped while its step was computed (cancel,
        superseded) reports 0 and stays dropped."""
        left = 0 if token in self.eos else run.left
        if self._runs.get(run.request_id) is not run:
            return 0
        if left == 0:
            del self._runs[run.request_id]
            return 0
        run.committed = [*run.committed, token]
        run.round += 1
        return left

    def hand_back(self) -> list[ServerRun]:
        """Every run, forgotten: the verifier is stopping and gives them back to their
        drafters (each gets a last verdict with 0 rounds left)."""
        runs, self._runs = list(self._runs.values()), {}
        return runs
