"""One simulated deployment: N devices, one serving mode, a scenario, a seed.

The simulation drives the services' own policy objects on a virtual clock:

* device side: each request is a ``wisp.policy.session.SpecSession``, the object the drafter
  service runs: it plans each round with the mode's ``default_policy`` (whose ``stop`` callback
  is fed the replayed draft features before drafting token i, as ``DraftEngine`` does), learns
  the device's draft speed, applies each verdict (EOS and length cut, statistics, wasted
  drafting); in modes with admission control the drafter's ``AdmissionController`` reads the
  scheduler's load ``snapshot`` (refreshed every 0.5 s, like the scheduler's housekeeping);
* server side: ``SchedulerCore`` with ``batch_policy`` (``SloAwarePolicy`` in wisp mode,
  ``FcfsPolicy`` otherwise), ``RoundInfo`` with the deadline of ``deadline_at`` and the
  ``expected_commit`` of ``wisp.policy.session``, batch completions fed back with ``complete``
  and the estimator refitted from the measured batch shape (as the estimator service does).

Time flows: device drafts (per-token time of its class, plus the prompt prefill in the first
round) -> uplink (half the RTT, jitter, block bytes / bandwidth, fixed software overhead) ->
paged KV memory (``wisp.sim.kv``: a new session waits FIFO for its prompt's blocks, a running
one grows its blocks, preempting the newest session when none are free) -> scheduler queue ->
forward(s) on a verifier (the engine's shape, ``server.engine``: ragged rows with chunked
prefill, or padded rows; true time from the timing model) -> downlink -> device commits
``accepted + 1`` tokens and drafts again.
Centralized mode with ``loop = "server"`` keeps the rounds on the server (a continuous-batching
decode loop) and only streams tokens down.

Randomness is drawn per device (``wisp.sim.streams``: common random numbers), so a device asks
the same requests in every mode and the modes are compared on identical workloads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.metrics import RequestRecord, summarize
from wisp.policy.controller import DraftLengthPolicy, FixedLength, LearnedController, default_policy
from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.policy.learned_estimator import default_estimator, load_estimator
from wisp.policy.scheduler import RoundInfo, SchedulerCore, round_terms
from wisp.policy.session import REPLAY_EOS, SpecSession, expected_commit, replay_tokens
from wisp.policy.site import CostTracker, LinkEstimate, ServerCosts, SiteChooser, SiteState
from wisp.policy.slo import AdmissionController, batch_policy, deadline_at, snapshot
from wisp.settings import Mode, Settings
from wisp.sim.devices import DeviceSpec, make_devices
from wisp.sim.engine import EventQueue
from wisp.sim.kv import PagedKv
from wisp.sim.scenario import Scenario, ScenarioError
from wisp.sim.server import (
    EngineModel,
    FastLinear,
    ProfileModel,
    ProfileSample,
    RooflineModel,
    TimeModel,
    find_asset,
    fit_learned,
    fit_linear,
    load_profile,
    lognormal_unit,
    synthetic_profile,
)
from wisp.sim.streams import DeviceStreams, PlannedRequest, server_stream
from wisp.sim.workload import AcceptanceBank, RequestShape, load_acceptance, load_shapes

# event kinds
K_REQUEST = 0   # a closed-loop user submits (a = device)
K_ARRIVAL = 1   # a Poisson request arrives at a device (a = device)
K_ROUND = 2     # a round reaches the server (a = session)
K_DONE = 3      # a verifier finished a batch (a = verifier index, b = batch record)
K_VERDICT = 4   # a verdict reaches the device (a = session)
K_TICK = 5      # run the scheduler now
K_TIMER = 6     # a scheduler wake-up (max-wait expiry)
K_DRAFTED = 7   # a shared drafter host finished a round (a = host, b = session)

SNAPSHOT_PERIOD_S = 0.5
"""The scheduler publishes its load snapshot every 0.5 s (housekeeping_loop)."""

# a session's place in the KV memory (wisp.sim.kv.PagedKv)
KV_NEW = 0       # its first round has not reached the server yet
KV_RUNNING = 1   # admitted: holds blocks
KV_WAITING = 2   # its round is at the server, waiting in the KV queue for admission
KV_EVICTED = 3   # preempted while its round was away (on the device or the network)
KV_DONE = 4      # finished or failed


# ---------------------------------------------------------------------- assets
@dataclass
class Assets:
    """Everything loaded from files once per scenario and shared by every sweep point."""

    bank: AcceptanceBank
    shapes: list[RequestShape]
    shapes_source: str
    model: TimeModel
    estimator_samples: list[ProfileSample]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"acceptance": self.bank.describe(), "workload": self.shapes_source,
                "timing": self.model.describe(), "estimator_samples": len(self.estimator_samples),
                "notes": list(self.notes)}


def load_assets(sc: Scenario) -> Assets:
    seed = sc.scenario.seed
    notes: list[str] = []
    bank = load_acceptance(sc.acceptance, seed)
    if bank.source == "synthetic":
        notes.append("acceptance: synthetic model (no recorded traces found)")
    shapes, shapes_src = load_shapes(sc.workload, bank, seed)
    srv = sc.server
    model: TimeModel
    if srv.timing == "profile":
        path = srv.profile
        p = find_asset("*profile*.json") if path == "auto" else None
        if path != "auto":
            p = __import__("pathlib").Path(path)
            if not p.exists():
                raise ScenarioError(f"server.profile = {path!r}: no such file")
        if p is None:
            raise ScenarioError("server.timing = profile but no profile was found: measure one with "
                                "`wisp-cli profile verifier` or set server.profile")
        prof = load_profile(p)
        model = ProfileModel(prof, srv.noise_cv, srv.prefill_ms_per_token, srv.truth_fit)
        est_samples = list(prof.samples) + list(prof.prefill)
    else:
        model = RooflineModel(srv.roofline, srv.noise_cv)
        est_samples = synthetic_profile(model, seed)
        notes.append("estimator: fitted on a synthetic profile of the roofline model")
    return Assets(bank, shapes, shapes_src, model, est_samples, notes)


# ---------------------------------------------------------------------- state
class Session:
    """A simulated request: its ``SpecSession`` (the same object the drafter service runs) plus
    what the simulator tracks about the round in flight."""

    __slots__ = (
        "rid", "dev", "prompt_len", "out_len", "seq_start", "t_submit", "in_window", "spec",
        "r_drafted", "r_accepted", "r_feats", "r_draft_ms", "r_passes", "r_up_ms", "r_ready",
        "t_arrive", "t_dispatch", "key", "host_wait", "prefill_ready", "req_index",
        "kv_state", "on_gpu", "recompute", "pf_total", "pf_done", "pf_seq", "pf_cut",
        "link", "srv", "run_left", "site", "r_sent", "r_verify_ms",
    )

    def __init__(self, rid: str, dev: DeviceSpec, shape: RequestShape, seq_start: int, t_submit: float,
                 in_window: bool, max_new: int, req_index: int = -1) -> None:
        self.rid = rid
        self.dev = dev
        self.req_index = req_index
        """Which of its device's planned requests this is (``DeviceStreams.requests``)."""
        self.prompt_len = shape.prompt_len
        self.out_len = shape.output_len
        self.seq_start = seq_start
        self.t_submit = t_submit
        self.in_window = in_window
        self.spec = SpecSession(shape.prompt_len, max_new, eos=frozenset({REPLAY_EOS}))
        self.r_drafted = 0
        self.r_passes = 0
        self.r_accepted = 0
        self.r_feats: list[Any] = []
        self.r_draft_ms = 0.0
        self.r_up_ms = 0.0
        self.r_ready = 0.0
        self.t_arrive = 0.0
        self.t_dispatch = 0.0
        self.key = ""
        self.host_wait = 0.0
        self.prefill_ready = 0.0
        """When the device's background prefill ends (after a draft-less prefill round)."""
        self.kv_state = KV_NEW
        self.on_gpu = False
        """Its round is in a batch handed to a verifier (or its prefill is being chunked there):
        it cannot be preempted until the round's verdict."""
        self.recompute = False
        """Preempted: the verifier holds none of its KV, so its next round recomputes the whole
        context (a prefill of prompt + generated tokens)."""
        self.pf_total = 0
        """Tokens its prefill round feeds in all (context + draft) ..."""
        self.pf_done = 0
        """... and how many of them the forwards so far fed (chunked prefill)."""
        self.pf_seq = 0
        self.pf_cut = False
        self.link = LinkEstimate()
        """Its measured round trip (the controller's goodput rule, the site choice) and per-token
        acceptance (adaptive site choice)."""
        self.srv = False
        """The server decodes it in its continuous batch (adaptive site choice, or a run)."""
        self.run_left = 0
        """Verdicts of a server run still to come (an undrafted round the controller chose hands
        ``server_run_rounds`` tokens to the server, ``SpecSession.plan``, as the drafter does);
        0: not in such a run."""
        self.site = SiteState()
        """Drafted, or in a server run (``SiteChooser.next_round``, as the drafter service)."""
        self.r_sent = 0.0
        self.r_verify_ms = 0.0

    @property
    def pos(self) -> int:
        """Tokens generated so far."""
        return len(self.spec.generated)

    @property
    def round(self) -> int:
        return self.spec.round


class _Host:
    __slots__ = ("busy", "inflight", "queue")

    def __init__(self) -> None:
        self.busy = False
        self.inflight = 0
        self.queue: deque[Session] = deque()


@dataclass
class Breakdown:
    rounds: int = 0
    drafting_ms: float = 0.0
    network_ms: float = 0.0
    queueing_ms: float = 0.0
    verification_ms: float = 0.0

    def per_round(self) -> dict[str, float]:
        n = max(self.rounds, 1)
        return {"rounds": self.rounds, "drafting_ms": self.drafting_ms / n,
                "network_ms": self.network_ms / n, "queueing_ms": self.queueing_ms / n,
                "verification_ms": self.verification_ms / n}


@dataclass
class SimResult:
    mode: str
    devices: int
    seed: int
    summary: dict[str, Any]
    records: list[RequestRecord]
    breakdown: dict[str, float]
    verifier_utilisation: float
    info: dict[str, Any]

    def as_dict(self, records: bool = False) -> dict[str, Any]:
        out = {"mode": self.mode, "devices": self.devices, "seed": self.seed, **self.summary,
               "breakdown": self.breakdown, "verifier_utilisation": self.verifier_utilisation,
               "info": self.info}
        if records:
            out["records"] = [r.__dict__ for r in self.records]
        return out


# ---------------------------------------------------------------------- the simulation
class Simulation:
    def __init__(
        self,
        sc: Scenario,
        mode: str,
        devices: int,
        *,
        assets: Assets | None = None,
        seed: int | None = None,
        policy: DraftLengthPolicy | None = None,
    ) -> None:
        """``policy`` replaces the mode's draft-length policy (a test's, or a controller being
        evaluated); by default the one the drafter service would run (``default_policy``)."""
        if devices < 1:
            raise ScenarioError("the simulation needs at least one device")
        self.sc = sc
        self.mode = mode
        self.mc = sc.mode(mode)
        self.n = devices
        self.seed = sc.scenario.seed if seed is None else seed
        self.assets = assets or load_assets(sc)
        seed_ = self.seed
        self.devs = make_devices(sc, devices, seed_)
        # common random numbers: every device draws from its own streams, in its own order, so
        # it asks the same requests in every mode (wisp.sim.streams); the batch-time noise is
        # the server's one stream
        self.streams = [DeviceStreams(seed_, d.index, self.assets.shapes, self.assets.bank.starts)
                        for d in self.devs]
        self.r_server = server_stream(seed_)
        self.retry_req: list[PlannedRequest | None] = [None] * devices
        """A closed-loop user's refused request, submitted again after the back-off (a user
        retries the same question), so a refusal does not shift the device's later requests.
        A refused Poisson arrival is dropped: the k-th arrival carries the k-th request."""
        self.q = EventQueue()
        self.warmup = sc.scenario.warmup_s
        self.t_end = self.warmup + sc.scenario.duration_s
        self.hard_end = self.t_end + sc.scenario.drain_s
        self.ttft_slo = sc.slo.ttft_ms
        self.tpot_slo = sc.slo.tpot_ms
        self.max_new = sc.workload.max_new_tokens
        self.centralized = mode == Mode.centralized.value
        self.server_loop = self.centralized and self.mc.loop == "server"

        # --- the engine: every mode's batches are capped at the engine's max_num_seqs
        srv = sc.server
        self.max_batch = (self.mc.max_batch_size if srv.max_num_seqs <= 0
                          else min(self.mc.max_batch_size, srv.max_num_seqs))
        self.engine = EngineModel(srv.engine, srv.max_num_batched_tokens)

        # --- policies: the services' own objects, built by the same functions
        settings = Settings(mode=mode, draft_k=self.mc.draft_k, max_batch_size=self.max_batch,
                            max_wait_ms=self.mc.max_wait_ms, max_inflight_batches=sc.server.max_inflight,
                            prefill_round=self.mc.prefill_round,
                            **({} if self.mc.server_run_rounds is None
                               else {"server_run_rounds": self.mc.server_run_rounds}))
        self.settings = settings
        if policy is not None:
            self.policy: DraftLengthPolicy = policy
            self.policy_note = f"{type(policy).__name__} (given)"
        elif mode == Mode.wisp.value and self.mc.controller == "fixed":
            self.policy = FixedLength(self.mc.draft_k)
            self.policy_note = f"FixedLength({self.mc.draft_k}) (scenario)"
        else:
            self.policy = default_policy(settings)
            self.policy_note = f"{type(self.policy).__name__} (wisp.policy.controller.default_policy)"
        self.batch_policy = batch_policy(settings)
        self.estimator = FastLinear(self._make_estimator())
        self.policy = self._with_deployment_costs(self.policy)
        self.core = SchedulerCore(self.batch_policy, self.estimator, max_inflight=sc.server.max_inflight,
                                  id_prefix="b")
        self.vnames = [f"v{i}" for i in range(sc.server.verifiers)]
        self.vspeed = list(sc.server.speeds) or [1.0] * sc.server.verifiers
        for name, sp in zip(self.vnames, self.vspeed, strict=True):
            if sp != 1.0:
                self.core.set_verifier_speed(name, sp)
        self.core.set_verifiers(self.vnames)
        self.vindex = {n: i for i, n in enumerate(self.vnames)}
        self.vbusy = [0] * len(self.vnames)
        self.admission = (
            AdmissionController(self.estimator, max_batch_size=self.max_batch,
                                draft_len=max(self.mc.draft_k, 1), headroom=self.mc.admission_headroom)
            if self.mc.admission else None
        )
        self._loads: list[Any] = []
        self._loads_at = -math.inf
        self.site = (SiteChooser(max_k=max(self.mc.draft_k, 1), hysteresis=self.mc.site_hysteresis)
                     if mode == Mode.wisp.value and self.mc.site == "adaptive" else None)
        """Per round: draft, or let the server decode (``wisp.policy.site``)."""
        self._costs: ServerCosts | None = None
        self._costs_at = -math.inf
        self.cost_tracker = CostTracker()
        """What the scheduler publishes (the services' own ``CostTracker``)."""
        self.srv_tokens = 0
        self.site_moves = 0
        self.run_starts = 0
        self.run_tokens = 0
        """Server runs the controller's undrafted rounds started, and the verdicts they made."""

        # --- server state
        self.model = self.assets.model
        self.noise_cv = self.model.noise_cv
        self.prefill_extra = getattr(self.model, "prefill_ms_per_token", -1.0)
        # one paged pool of kv_tokens per verifier, shared (a session is admitted before the
        # scheduler places it on a verifier)
        self.kv: PagedKv[Session] = PagedKv(srv.kv_tokens * srv.verifiers if srv.kv_tokens > 0 else 0,
                                            srv.kv_block_tokens, srv.kv_watermark)
        nv = len(self.vnames)
        self.carry: list[list[Session]] = [[] for _ in range(nv)]
        """Per verifier: prefill rounds whose chunks are not all fed yet, oldest first."""
        self.vhold = [False] * nv
        """Per verifier: a forward of carried prefill chunks alone is running (the scheduler does
        not know it: a batch it dispatches meanwhile waits in ``vpending``)."""
        self.vpending: list[list[tuple[Any, list[Session]]]] = [[] for _ in range(nv)]
        self._pf_seq = 0
        self.contention = sc.server.contention
        self.hosts = [_Host() for _ in range(sc.devices.drafter_hosts)]
        self.by_key: dict[str, Session] = {}
        self.tick_pending = False
        self.timer_at: float | None = None

        # --- acceptance ring
        bank = self.assets.bank
        self.feat = bank.features
        self.match = bank.match
        self.ring = bank.size
        self.starts = bank.starts
        self.shapes = self.assets.shapes

        # --- accounting
        self.records: list[RequestRecord] = []
        self.record_class: list[str] = []
        self.submitted_in_window = 0
        self.open_in_window = 0
        self.refused = 0
        self.kv_waits = 0
        self.kv_failed = 0
        self.kv_leaked_blocks = 0
        self.forwards = 0
        self.chunked_prefills = 0
        self.bd = Breakdown()
        self.busy_ms = [0.0] * len(self.vnames)
        self.batches = 0
        self.batch_rows = 0
        self.est_err = 0.0
        self.est_n = 0
        self.active: set[Session] = set()
        self.queued_requests: list[deque[float]] = [deque() for _ in range(devices)]
        self.dev_busy = [False] * devices
        self._rid = 0

    # ------------------------------------------------------------------ setup
    def _with_deployment_costs(self, pol: DraftLengthPolicy) -> DraftLengthPolicy:
        """With ``controller_costs = "deployment"`` a learned controller weighs one more draft
        token against this deployment's verify estimator instead of the cost model it was
        trained with. Its draft time per token is each session's measured EMA in both cases
        (``SpecSession.drafted``), as in the drafter service."""
        if self.mc.controller_costs != "deployment" or not isinstance(pol, LearnedController):
            return pol
        self.policy_note += " (verify cost: the deployment's estimator)"
        return pol.replace(verify_ms=self.estimator)

    def _make_estimator(self) -> Any:
        """The scheduler's estimator (and admission control's), per ``server.estimator``."""
        ec = self.sc.server.estimator
        if ec.kind == "prior":
            return LinearEstimator()
        if ec.kind == "file":
            return load_estimator(Path(ec.estimator_file).read_text())
        if ec.kind == "default":
            return default_estimator(Settings(target_model=ec.target_model, device=ec.device))
        if ec.kind == "learned":
            est = fit_learned(self.assets.estimator_samples, ec.learned_trees)
            if est is not None:
                return est
        return fit_linear(self.assets.estimator_samples)

    # ------------------------------------------------------------------ run
    def run(self) -> SimResult:
        wall = time.perf_counter()
        q = self.q
        users = self.sc.workload.users
        for d in self.devs:
            st = self.streams[d.index]
            if users == "closed":
                stagger = self.sc.workload.stagger_s
                span = self.sc.workload.think_s if stagger < 0 else stagger
                q.push(st.stagger(span), K_REQUEST, d)
            else:
                q.push(st.arrival_gap(self.sc.workload.rate_per_device), K_ARRIVAL, d)
        heap = q.heap
        t_end, hard_end = self.t_end, self.hard_end
        while heap:
            t, _, kind, a, b = q.pop()
            if t > hard_end or (t > t_end and self.open_in_window == 0):
                break
            if kind == K_ROUND:
                self._on_round(a, t)
            elif kind == K_VERDICT:
                self._on_verdict(a, t)
            elif kind == K_DONE:
                self._on_done(a, b, t)
            elif kind == K_TICK or kind == K_TIMER:
                if kind == K_TIMER:
                    if self.timer_at is not None and t >= self.timer_at:
                        self.timer_at = None
                self._tick(t)
            elif kind == K_DRAFTED:
                self._on_drafted(a, b, t)
            elif kind == K_REQUEST:
                if t < t_end:
                    self._submit(a, t)
            elif kind == K_ARRIVAL:
                self._on_arrival(a, t)
        # whatever was submitted in the window and has not finished is a failure
        for s in sorted(self.active, key=lambda s: s.rid):
            if s.in_window:
                self._record_failed(s.t_submit, s)
        # KV blocks held by no live session at the end (0 unless the bookkeeping is wrong)
        kv = self.kv
        self.kv_leaked_blocks = (kv.used_blocks - sum(kv.held.values())
                                 + sum(n for s, n in kv.held.items() if s not in self.active))
        for dev, dq in zip(self.devs, self.queued_requests, strict=True):
            for t_sub in dq:
                if self.warmup <= t_sub < t_end:
                    self._record_failed(t_sub, None, dev.cls)
        return self._result(time.perf_counter() - wall)

    # ------------------------------------------------------------------ requests
    def _on_arrival(self, dev: DeviceSpec, t: float) -> None:
        if t >= self.t_end:
            return
        self.q.push(t + self.streams[dev.index].arrival_gap(self.sc.workload.rate_per_device), K_ARRIVAL, dev)
        if self.dev_busy[dev.index]:
            self.queued_requests[dev.index].append(t)
            if self.warmup <= t < self.t_end:
                self.submitted_in_window += 1
                self.open_in_window += 1
            return
        self._submit(dev, t)

    def _submit(self, dev: DeviceSpec, t: float, t_submit: float | None = None,
                counted: bool = False) -> None:
        ts = t if t_submit is None else t_submit
        in_window = self.warmup <= ts < self.t_end
        if in_window and not counted:
            self.submitted_in_window += 1
            self.open_in_window += 1
        req = self.retry_req[dev.index]
        self.retry_req[dev.index] = None
        if req is None:
            req = self.streams[dev.index].next_request()
        shape = req.shape
        self._rid += 1
        sess = Session(f"r{self._rid}", dev, shape, req.seq_start, ts, in_window, self.max_new, req.index)
        self.dev_busy[dev.index] = True
        if self.admission is not None:
            decision = self.admission.decide(self._load_snapshot(t), self.ttft_slo, self.tpot_slo,
                                             prompt_len=shape.prompt_len)
            if not decision.admit:
                self.refused += 1
                if in_window:
                    self._record_failed(ts, sess)
                if self.sc.workload.users == "closed":  # a Poisson arrival is not retried
                    self.retry_req[dev.index] = req
                self._device_free(dev, t, refused=True)
                return
        self.active.add(sess)
        self._begin_round(sess, t)

    def _load_snapshot(self, now: float) -> list[Any]:
        """The scheduler's load snapshot, as stale as the service's, with the KV memory's report
        (one pool shared by the verifiers: each reports the pool's free tokens above the
        watermark and its wait queue)."""
        if now - self._loads_at >= SNAPSHOT_PERIOD_S:
            tpot = self.tpot_slo
            loads = snapshot(self.core, now, lambda _rid: tpot)
            kv = self.kv
            if not kv.unlimited:
                free, waiting = kv.admissible_tokens(), len(kv.waiting)
                loads = [dataclasses.replace(v, kv_free_tokens=free, kv_waiting=waiting) for v in loads]
            self._loads = loads
            self._loads_at = now
        return self._loads

    def _device_free(self, dev: DeviceSpec, t: float, refused: bool = False) -> None:
        self.dev_busy[dev.index] = False
        wl = self.sc.workload
        if wl.users == "closed":
            st = self.streams[dev.index]
            self.q.push(t + (st.retry(wl.retry_s) if refused else st.think(wl.think_s)), K_REQUEST, dev)
        else:
            dq = self.queued_requests[dev.index]
            if dq:
                ts = dq.popleft()
                self._submit(dev, t, ts, counted=True)

    # ------------------------------------------------------------------ device side
    def _begin_round(self, s: Session, now: float) -> None:
        """Plan and draft one round on the device (replaying the acceptance ring)."""
        dev = s.dev
        drafted = 0
        accepted = 0
        passes = 0
        # centralized serving's server-side loop is the scenario's ``loop``; elsewhere a round
        # the controller leaves undrafted hands a run to the server, as in the drafter service
        plan = s.spec.plan(self.policy, can_draft=not self.centralized,
                           server_run=0 if self.centralized else self.settings.server_run_rounds,
                           round_trip_ms=s.link.rtt_ms)
        k = plan.max_k
        if plan.server_rounds:
            s.srv = True
            s.run_left = plan.server_rounds + 1  # this round's verdict, then the run's tokens
            self.run_starts += 1
        if self.site is not None and s.round > 0 and k > 0:
            was = s.site.on_server
            choice = self.site.next_round(s.site, draft_ms=s.spec.stats.draft_ms_per_token,
                                          link=s.link, server=self._server_costs(now),
                                          tpot_slo_ms=self.tpot_slo)
            if choice.server_decode:  # hand the session to the server's continuous batch
                s.srv = True
                if not was:
                    self.site_moves += 1
                k = 0
            else:
                k = min(k, choice.k)
        s.r_feats = []
        if k > 0:
            stop = plan.stop
            feat, match, ring = self.feat, self.match, self.ring
            base = s.seq_start + s.pos
            stopped = False
            if stop is None:
                drafted = k
            else:
                for i in range(k):
                    if stop(i, feat[(base + i) % ring]):
                        stopped = True
                        break
                    drafted += 1
            passes = drafted + (1 if stopped else 0)
            for i in range(drafted):
                if match[(base + i) % ring]:
                    accepted += 1
                else:
                    break
            s.r_feats = [feat[(base + i) % ring] for i in range(drafted)]
        s.r_drafted = drafted
        s.r_accepted = accepted
        s.r_passes = passes
        if passes:
            jit = lognormal_unit(self.streams[dev.index].draft, dev.round_jitter_cv)
            if s.round == 0:
                ms = (s.prompt_len * dev.prefill_ms_per_token + (passes - 1) * dev.draft_ms) * jit
            else:
                ms = passes * dev.draft_ms * jit
                if s.prefill_ready > now:  # drafting waits for the background prefill
                    ms += (s.prefill_ready - now) * 1000.0
        else:
            ms = 0.0
            if plan.prefill:
                # a prefill round (the controller's): the prompt leaves at once and the device
                # prefills its draft model meanwhile, as the drafter service does
                s.prefill_ready = now + s.prompt_len * dev.prefill_ms_per_token / 1000.0
        s.r_draft_ms = ms
        if self.hosts and ms > 0:
            host = self.hosts[dev.index % len(self.hosts)]
            s.r_ready = now
            if host.busy:
                host.queue.append(s)
            else:
                self._start_drafts(host, [s], now)
            return
        s.host_wait = 0.0
        self._send(s, now + ms / 1000.0)

    def _start_drafts(self, host: _Host, batch: list[Session], now: float) -> None:
        """A shared host drafts ``batch`` together: each round takes its own drafting time,
        scaled by the batched step's cost, and leaves when done; the host is free when all
        are (as ``DraftEngine.draft_many`` and the drafter service's verdict loop behave)."""
        host.busy = True
        host.inflight = len(batch)
        scale = 1.0 + self.sc.devices.drafter_batch_growth * (len(batch) - 1)
        if self.contention > 1.0 and any(self.vbusy):
            scale *= self.contention
        for s in batch:
            s.host_wait = (now - s.r_ready) * 1000.0
            s.r_draft_ms *= scale
            self.q.push(now + s.r_draft_ms / 1000.0, K_DRAFTED, self.hosts.index(host), s)

    def _on_drafted(self, hi: int, s: Session, now: float) -> None:
        host = self.hosts[hi]
        host.inflight -= 1
        self._send(s, now)
        if host.inflight > 0:
            return
        host.busy = False
        if host.queue:
            n = min(len(host.queue), self.sc.devices.drafter_batch)
            self._start_drafts(host, [host.queue.popleft() for _ in range(n)], now)

    def _one_way(self, dev: DeviceSpec, nbytes: float, up: bool) -> float:
        """ms for one message between device and server."""
        ms = dev.rtt_ms * 0.5 + nbytes / (dev.up_bytes_per_ms if up else dev.down_bytes_per_ms)
        if dev.jitter_ms > 0:
            st = self.streams[dev.index]
            ms += (st.uplink if up else st.downlink).expovariate(1.0 / dev.jitter_ms)
        return ms

    def _send(self, s: Session, t_ready: float) -> None:
        s.spec.drafted(s.r_draft_ms, s.r_passes)  # the round leaves the device: its time is known
        s.r_sent = t_ready
        dc = self.sc.devices
        nbytes = dc.block_header_bytes + s.r_drafted * dc.bytes_per_draft_token
        if s.round == 0:
            nbytes += s.prompt_len * self.sc.workload.chars_per_token
        up = self._one_way(s.dev, nbytes, True) + self.sc.network.round_overhead_ms
        s.r_up_ms = up
        self.q.push(t_ready + up / 1000.0, K_ROUND, s)

    # ------------------------------------------------------------------ server side
    def _on_round(self, s: Session, now: float) -> None:
        """A round reaches the server. A running session's KV grows to hold it (preempting the
        newest sessions when memory is short) and it enters the scheduler; a new session joins
        the KV wait queue (FIFO) and a preempted one its front, and enters when admitted."""
        s.t_arrive = now
        if s.kv_state == KV_RUNNING:
            if self.kv.grow(s, s.prompt_len + len(s.spec.generated) + s.r_drafted) or self._kv_grow(s, now):
                self._enqueue(s, now)
            return
        kv = self.kv
        if s.kv_state == KV_EVICTED:
            kv.waiting.appendleft(s)
        else:
            kv.waiting.append(s)
        s.kv_state = KV_WAITING
        self._kv_admit(now)
        if s.kv_state == KV_WAITING:
            self.kv_waits += 1

    @staticmethod
    def _kv_need(s: Session) -> int:
        """Tokens whose KV a session holds while its round is verified: its committed context
        plus the draft's slots (the first round: prompt + draft)."""
        return s.prompt_len + s.pos + s.r_drafted

    def _kv_admit(self, now: float) -> None:
        """Admit waiting sessions in order while the head fits above the watermark; a head that
        can never fit fails (it would block the queue for ever)."""
        kv = self.kv
        wq = kv.waiting
        while wq:
            s = wq[0]
            need = self._kv_need(s)
            if not kv.fits_ever(need):
                wq.popleft()
                self._kv_fail(s, now)
                continue
            if not kv.can_admit(need):
                return
            wq.popleft()
            kv.admit(s, need)
            s.kv_state = KV_RUNNING
            self._enqueue(s, now)

    def _kv_grow(self, s: Session, now: float) -> bool:
        """Give running session ``s`` the blocks of its round, preempting the most recently
        admitted session whose round is not on a verifier until they fit (vLLM's recompute
        preemption). False when ``s`` itself was preempted (or can never fit, and failed)."""
        kv = self.kv
        need = self._kv_need(s)
        if kv.blocks(need) > kv.total:
            kv.release(s)
            self._kv_fail(s, now)
            self._kv_admit(now)
            return False
        while not kv.grow(s, need):
            victim = next(v for v in kv.newest_first() if not v.on_gpu)  # s itself qualifies
            self._preempt(victim, here=victim is s)
            if victim is s:
                return False
        return True

    def _preempt(self, v: Session, here: bool) -> None:
        """Free every block of running session ``v``; nothing of it stays cached, so its next
        round recomputes its context. If that round is at the server (``here``: the session
        growing, or a round queued in the scheduler, which is withdrawn) it waits at the front of
        the KV queue; otherwise it goes there when the round arrives."""
        kv = self.kv
        kv.release(v)
        kv.preemptions += 1
        v.recompute = True
        if not here and v.key in self.by_key:  # queued, not dispatched: take it back
            self.core.withdraw(v.key)
            del self.by_key[v.key]
            here = True
        if here:
            kv.waiting.appendleft(v)
            v.kv_state = KV_WAITING
            self.kv_waits += 1
        else:
            v.kv_state = KV_EVICTED

    def _kv_fail(self, s: Session, now: float) -> None:
        """A session that can never fit in KV memory fails (recorded like any failed request)."""
        self.kv_failed += 1
        s.kv_state = KV_DONE
        self.active.discard(s)
        self.core.finish_request(s.rid)
        if s.in_window:
            self._record_failed(s.t_submit, s)
        self._device_free(s.dev, now)

    def _enqueue(self, s: Session, now: float) -> None:
        spec = s.spec
        pos = len(spec.generated)
        key = f"{s.rid}:{spec.round}"
        s.key = key
        info = RoundInfo(
            key=key,
            request_id=s.rid,
            round=spec.round,
            **round_terms(s.r_drafted, s.prompt_len + pos, pos, cached=not s.recompute),
            arrival=now,
            deadline=deadline_at(pos, s.t_submit, self.ttft_slo, self.tpot_slo, spec.first_token_ts),
            predicted_ms=0.0,
            expected_commit=expected_commit(f.top1_prob for f in s.r_feats),
            generated_len=pos,
            max_new_tokens=self.max_new,
            tpot_slo_ms=self.tpot_slo,
        )
        self.by_key[key] = s
        for old in self.core.add(info):
            self.by_key.pop(old, None)
        if not self.tick_pending and self._idle_verifier():
            self.tick_pending = True
            self.q.push(now, K_TICK)

    def _idle_verifier(self) -> bool:
        cap = self.core.max_inflight
        return any(b < cap for b in self.vbusy)

    def _tick(self, now: float) -> None:
        self.tick_pending = False
        out = self.core.tick(now)
        for plan in out.batches:
            self._dispatch(plan, now)
        # a verifier the scheduler left idle feeds what is left of its chunked prefills
        for vi, carried in enumerate(self.carry):
            if carried and self.vbusy[vi] == 0:
                self.vhold[vi] = True
                self._forward(vi, None, [], now)
        w = out.wake_at
        if w is not None and self.queue_nonempty():
            if self.timer_at is None or w < self.timer_at or self.timer_at < now:
                self.timer_at = max(w, now)
                self.q.push(self.timer_at, K_TIMER)

    def queue_nonempty(self) -> bool:
        return bool(self.core.queue)

    def _dispatch(self, plan: Any, now: float) -> None:
        vi = self.vindex[plan.verifier]
        sessions = [self.by_key.pop(k) for k in plan.keys]
        for s in sessions:
            s.on_gpu = True
        if self.vhold[vi]:  # the verifier is feeding carried prefill chunks: this batch is next
            self.vpending[vi].append((plan, sessions))
            return
        self._forward(vi, plan, sessions, now)

    def _forward(self, vi: int, plan: Any, sessions: list[Session], now: float) -> None:
        """One forward on verifier ``vi``: the batch's verify rows (whole), then the prefill rows
        (the verifier's carried ones first, then the batch's first rounds and recomputes), cut
        to the token budget by a chunking engine; the truth model prices the engine's shape."""
        new: list[int] = []
        ctx: list[int] = []
        done: list[Session] = []
        prefills = self.carry[vi]
        self.carry[vi] = []
        for s in sessions:
            s.t_dispatch = now
            if s.round == 0 or s.recompute:  # no cache: the whole context is fed
                s.pf_total = s.prompt_len + s.pos + s.r_drafted
                s.pf_done = 0
                s.pf_cut = False
                self._pf_seq += 1
                s.pf_seq = self._pf_seq
                prefills.append(s)
            else:
                new.append(s.r_drafted + 1)
                ctx.append(s.prompt_len + s.pos - 1)
                done.append(s)
        carried: list[Session] = []
        prefill_tokens = 0
        if prefills:
            cuts = self.engine.chunks(sum(new), [p.pf_total - p.pf_done for p in prefills])
            for p, c in zip(prefills, cuts, strict=True):
                if c > 0:
                    start = p.pf_done
                    new.append(c)
                    ctx.append(start)
                    context = p.pf_total - p.r_drafted
                    if start < context:
                        prefill_tokens += min(start + c, context) - start
                    p.pf_done = start + c
                if p.pf_done >= p.pf_total:
                    done.append(p)
                else:
                    if not p.pf_cut:
                        p.pf_cut = True
                        self.chunked_prefills += 1
                    carried.append(p)
        priced_new, priced_ctx = self.engine.priced(new, ctx)
        ms = self.model.mean_ms(priced_new, priced_ctx)
        if self.prefill_extra > 0:
            ms += self.prefill_extra * prefill_tokens
        ms *= lognormal_unit(self.r_server, self.noise_cv) / self.vspeed[vi]
        if self.contention > 1.0 and self.hosts and any(h.busy for h in self.hosts):
            ms *= self.contention
        self.vbusy[vi] += 1
        self.forwards += 1
        self.q.push(now + ms / 1000.0, K_DONE, vi, (plan, done, carried, new, ctx, ms, now))

    def _on_done(self, vi: int, rec: tuple[Any, ...], now: float) -> None:
        plan, done, carried, new, ctx, ms, t0 = rec
        self.vbusy[vi] -= 1
        if plan is not None:
            self.core.complete(plan.batch_id)
            if self.warmup <= t0 < self.t_end:
                self.batches += 1
                self.batch_rows += len(plan.keys)
                self.est_err += abs(plan.predicted_ms - ms) / ms
                self.est_n += 1
        else:
            self.vhold[vi] = False
        lo, hi = max(t0, self.warmup), min(now, self.t_end)
        if hi > lo:
            self.busy_ms[vi] += (hi - lo) * 1000.0
        if self.sc.server.estimator.online_refit:
            self.estimator.observe(BatchShape.of(new, ctx), ms, now)
        if self.site is not None:  # what the scheduler observes of each forward (TimingSample)
            self.cost_tracker.observe(new, ctx, ms)
        if carried:
            held = self.carry[vi]
            held.extend(carried)
            held.sort(key=lambda x: x.pf_seq)
        kv = self.kv
        for s in done:
            s.on_gpu = False
            s.recompute = False
            if s.in_window:
                bd = self.bd
                bd.rounds += 1
                bd.drafting_ms += s.r_draft_ms
                bd.queueing_ms += (s.t_dispatch - s.t_arrive) * 1000.0 + s.host_wait
                bd.verification_ms += (now - s.t_dispatch) * 1000.0
                bd.network_ms += s.r_up_ms
            # after the verdict the rejected draft's slots are freed: the committed context stays
            pos = len(s.spec.generated)
            kv.shrink(s, s.prompt_len + pos + min(s.r_accepted + 1, max(1, s.out_len - pos)))
            down = self._one_way(s.dev, self.sc.devices.verdict_bytes, False)
            s.r_verify_ms = (now - s.t_dispatch) * 1000.0
            if s.srv and s.run_left:
                s.run_left -= 1
                self.run_tokens += 1
                if not s.run_left:  # the run is over: the verdict goes to the device
                    s.srv = False
            elif s.srv:
                self.srv_tokens += 1
                s.site.server_tokens += 1
                if self.site is not None and not self.site.run_left(s.site):
                    # the run is over: the verdict goes to the device, which drafts a probe next
                    s.srv = False
                    self.site_moves += 1
            if self.server_loop or s.srv:
                finished = self._commit(s, now + down / 1000.0)
                if finished:
                    self._finish(s, now, now + down / 1000.0)
                else:  # the server decodes the next token itself: no edge round trip
                    s.r_drafted = s.r_accepted = s.r_passes = 0
                    s.r_feats = []
                    s.r_draft_ms = s.r_up_ms = s.host_wait = 0.0
                    s.spec.drafted(0.0, 0)
                    self._on_round(s, now)
            else:
                if s.in_window:
                    self.bd.network_ms += down
                self.q.push(now + down / 1000.0, K_VERDICT, s)
        if plan is None and self.vpending[vi]:  # batches dispatched while the carry was fed
            pending = self.vpending[vi]
            self.vpending[vi] = []
            for p, sessions in pending:
                self._forward(vi, p, sessions, now)
        if kv.waiting:
            self._kv_admit(now)
        if not self.tick_pending:
            self.tick_pending = True
            self.q.push(now, K_TICK)

    # ------------------------------------------------------------------ site choice
    def _server_costs(self, now: float) -> ServerCosts | None:
        """What the scheduler publishes every ``SNAPSHOT_PERIOD_S`` (as stale as the load
        snapshot): the forward time at the current load (an EMA of measured forwards), the
        estimator's marginal cost of one more row and one more fed token on the last batch's
        shape, whether the verifiers were busy (over 90% of the period) with compute-limited
        forwards (the batch's marginal costs over half a forward), and whether KV memory is the
        limit (sessions waiting, or over 90% in use)."""
        if now - self._costs_at < SNAPSHOT_PERIOD_S:
            return self._costs
        self._costs_at = now
        kv = self.kv
        kv_bound = not kv.unlimited and (bool(kv.waiting) or kv.used_blocks > 0.9 * kv.total)
        self._costs = self.cost_tracker.costs(now, self.estimator.predict_rows,
                                              verifiers=len(self.vnames), kv_bound=kv_bound)
        return self._costs

    # ------------------------------------------------------------------ verdicts
    def _on_verdict(self, s: Session, now: float) -> None:
        if s.r_drafted > 0:  # the round trip the controller and the site choice weigh
            s.link.observe_round(s.r_drafted, s.r_accepted,
                                 (now - s.r_sent) * 1000.0 - s.r_verify_ms)
        if self._commit(s, now):
            self._finish(s, now, now)
        else:
            self._begin_round(s, now)

    def _commit(self, s: Session, t_arr: float) -> bool:
        """Apply the round's verdict through the session's ``SpecSession`` (the drafter's own
        rule): ``accepted + 1`` tokens, the last natural one an EOS. True when it finished."""
        tokens = replay_tokens(s.r_accepted + 1, s.out_len - s.pos)
        return s.spec.apply(tokens, s.r_drafted, s.r_accepted, t_arr).finish is not None

    def _finish(self, s: Session, now: float, t_device: float) -> None:
        self.active.discard(s)
        if s.kv_state == KV_RUNNING:
            self.kv.release(s)
        s.kv_state = KV_DONE
        if self.kv.waiting:
            self._kv_admit(now)
        self.core.finish_request(s.rid)
        if s.in_window:
            n = s.pos
            sp = s.spec
            t_first = sp.first_token_ts if sp.first_token_ts is not None else t_device
            t_last = sp.last_token_ts if sp.last_token_ts is not None else t_first
            self.records.append(RequestRecord(
                ttft_ms=(t_first - s.t_submit) * 1000.0,
                tpot_ms=((t_last - t_first) / (n - 1) * 1000.0) if n > 1 else 0.0,
                e2e_ms=(t_last - s.t_submit) * 1000.0,
                tokens=n,
                ttft_slo_ms=self.ttft_slo,
                tpot_slo_ms=self.tpot_slo,
                drafted=sp.stats.drafted,
                accepted=sp.stats.accepted,
                rounds=sp.stats.rounds,
                wasted_draft_ms=sp.wasted_ms,
            ))
            self.record_class.append(s.dev.cls)
            self.open_in_window -= 1
        self._device_free(s.dev, max(t_device, now))

    def _record_failed(self, t_submit: float, s: Session | None, cls: str = "?") -> None:
        inf = float("inf")
        self.records.append(RequestRecord(
            ttft_ms=inf, tpot_ms=inf, e2e_ms=inf, tokens=s.pos if s else 0,
            ttft_slo_ms=self.ttft_slo, tpot_slo_ms=self.tpot_slo,
            drafted=s.spec.stats.drafted if s else 0, accepted=s.spec.stats.accepted if s else 0,
            rounds=s.spec.stats.rounds if s else 0, wasted_draft_ms=s.spec.wasted_ms if s else 0.0,
            ok=False,
        ))
        self.record_class.append(s.dev.cls if s else cls)
        self.open_in_window -= 1

    # ------------------------------------------------------------------ result
    def _result(self, wall_s: float) -> SimResult:
        dur = self.sc.scenario.duration_s
        summ = summarize(self.records, dur).as_dict()
        ok = [r for r in self.records if r.ok]
        summ["tpot_mean_ms"] = (sum(r.tpot_ms for r in ok) / len(ok)) if ok else float("nan")
        summ["ttft_mean_ms"] = (sum(r.ttft_ms for r in ok) / len(ok)) if ok else float("nan")
        util = sum(self.busy_ms) / (dur * 1000.0 * len(self.vnames))
        by_class: dict[str, list[RequestRecord]] = {}
        for rec, cls in zip(self.records, self.record_class, strict=True):
            by_class.setdefault(cls, []).append(rec)
        info = {
            "attainment_by_class": {c: round(sum(r.attained for r in rs) / len(rs), 4)
                                    for c, rs in sorted(by_class.items())},
            "draft_policy": self.policy_note,
            "batch_policy": type(self.batch_policy).__name__,
            "submitted_in_window": self.submitted_in_window,
            "recorded": len(self.records),
            "refused": self.refused,
            "engine": self.engine.kind,
            "max_num_batched_tokens": self.engine.token_budget,
            "max_batch_size": self.max_batch,
            "kv_blocks": 0 if self.kv.unlimited else self.kv.total,
            "kv_waits": self.kv_waits,
            "kv_preemptions": self.kv.preemptions,
            "kv_failed": self.kv_failed,
            "kv_peak_tokens": self.kv.peak_tokens,
            "kv_leaked_blocks": self.kv_leaked_blocks,
            "forwards": self.forwards,
            "chunked_prefills": self.chunked_prefills,
            "batches": self.batches,
            "mean_batch_rounds": self.batch_rows / self.batches if self.batches else 0.0,
            "estimator_mape": self.est_err / self.est_n if self.est_n else float("nan"),
            "events": self.q.popped,
            "duration_s": dur,
            "sim_end_s": self.q.now,
            "wall_s": round(wall_s, 3),
            "centralized_loop": self.mc.loop if self.centralized else None,
            "site": self.mc.site if self.mode == Mode.wisp.value else None,
            "server_decoded_tokens": self.srv_tokens,
            "site_moves": self.site_moves,
            "server_runs": self.run_starts,
            "server_run_tokens": self.run_tokens,
        }
        return SimResult(self.mode, self.n, self.seed, summ, self.records, self.bd.per_round(),
                         util, info)


def simulate(sc: Scenario, mode: str, devices: int, *, assets: Assets | None = None,
             seed: int | None = None) -> SimResult:
    return Simulation(sc, mode, devices, assets=assets, seed=seed).run()
