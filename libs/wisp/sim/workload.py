"""What the simulated users ask and how the draft model fares on it.

* **Lengths**: prompt and output lengths from the packaged ShareGPT data (``wisp.data``), from
  recorded requests, or log-normal.
* **Acceptance**: per output position, the draft's features (``TokenFeatures``) and whether the
  draft's token matches the target's. Under greedy decoding the draft token at output position
  ``j`` (drafted on the committed prefix) matches the target independently of how the rounds
  were cut, so one recorded (features, verdict) sequence replays exactly under *any* draft-length
  policy: the controller sees the real feature sequence and a round's acceptance is the run of
  matches from its first position. Positions a recording never judged (the bonus token after a
  fully accepted round) get a (features, verdict) pair drawn from the same recording.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.features import TokenFeatures
from wisp.sim.scenario import AcceptanceCfg, ScenarioError, WorkloadCfg

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Packaged simulator data (the acceptance bank derived from the real pair's traces)."""

TRACE_REQUIRED = ("request_id", "round", "position", "top1_prob", "entropy", "margin",
                  "logit_spread", "drafted", "accepted")


# ---------------------------------------------------------------------- acceptance sequences
@dataclass
class AcceptanceSeq:
    """One request's per-output-position draft features and match verdicts."""

    features: list[TokenFeatures]
    match: list[bool]
    request_id: str = ""
    prompt_len: int | None = None
    output_len: int | None = None
    imputed: int = 0

    def __len__(self) -> int:
        return len(self.match)


@dataclass
class AcceptanceBank:
    """All sequences concatenated into one ring; a session reads it from a sequence start."""

    seqs: list[AcceptanceSeq]
    source: str
    path: str = ""
    features: list[TokenFeatures] = field(default_factory=list)
    match: list[bool] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    scaled_to: float = 0.0
    """The ``acceptance.target_rate`` its verdicts were scaled to (0: as recorded)."""

    def __post_init__(self) -> None:
        if not self.seqs or not any(len(s) for s in self.seqs):
            raise ScenarioError("the acceptance bank is empty")
        pos = 0
        for s in self.seqs:
            self.starts.append(pos)
            self.features.extend(s.features)
            self.match.extend(s.match)
            pos += len(s)

    @property
    def size(self) -> int:
        return len(self.match)

    def acceptance_rate(self) -> float:
        return sum(self.match) / len(self.match)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sequences": len(self.seqs),
                "positions": self.size, "match_rate": round(self.acceptance_rate(), 4),
                "imputed": sum(s.imputed for s in self.seqs), "scaled_to": self.scaled_to}


def _features(row: dict[str, Any]) -> TokenFeatures:
    return TokenFeatures(top1_prob=float(row["top1_prob"]), entropy=float(row["entropy"]),
                         margin=float(row["margin"]), logit_spread=float(row["logit_spread"]))


def read_trace_rows(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Trace rows from a JSONL (``wisp-cli trace record``) and its ``.meta.json`` sidecar, if
    any. Lines that are not JSON objects with the required fields are skipped."""
    p = Path(path)
    rows: list[dict[str, Any]] = []
    with p.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and all(k in obj for k in TRACE_REQUIRED):
                rows.append(obj)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    meta_file = p.with_name(stem + ".meta.json")
    meta: dict[str, Any] = {}
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            meta = {}
    return rows, meta


def sequences_from_rows(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None,
                        seed: int = 0) -> list[AcceptanceSeq]:
    """Rebuild each request's per-position sequence from its trace rows.

    A round's first output position is ``context_len - prompt_len`` when the rows carry the
    context (prompt length from the sidecar, else the request's smallest context), otherwise
    the sum of ``accepted + 1`` over the request's earlier rounds. Row ``position i`` of a round
    starting at ``s`` is output position ``s + i``; its verdict is ``label == 0`` (or, without a
    label, ``i < accepted``)."""
    meta = meta or {}
    by_req: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_req[str(r["request_id"])].append(r)
    listed = meta.get("requests") or meta.get("prompts") or []
    reqs = {str(m.get("request_id")): m for m in listed if isinstance(m, dict)}
    rng = random.Random(f"{seed}:impute")
    # a never-judged position follows an accepted token: impute from rows that did too
    pool = [(_features(r), _verdict(r)) for r in rows if int(r["position"]) >= 1]
    pool = pool or [(_features(r), _verdict(r)) for r in rows]
    out: list[AcceptanceSeq] = []
    for rid in sorted(by_req):
        rs = by_req[rid]
        info = reqs.get(rid, {})
        prompt_len = len(info["prompt_token_ids"]) if isinstance(info.get("prompt_token_ids"), list) else None
        output_len = len(info["token_ids"]) if isinstance(info.get("token_ids"), list) else None
        rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            rounds[int(r["round"])].append(r)
        ctxs = [int(r.get("context_len") or 0) for r in rs]
        use_ctx = all(c > 0 for c in ctxs)
        base = prompt_len if (use_ctx and prompt_len) else (min(ctxs) if use_ctx else 0)
        cells: dict[int, tuple[TokenFeatures, bool]] = {}
        cursor = 0
        for rnd in sorted(rounds):
            rr = sorted(rounds[rnd], key=lambda r: int(r["position"]))
            start = int(rr[0].get("context_len") or 0) - base if use_ctx else cursor
            for r in rr:
                j = start + int(r["position"])
                if j >= 0 and j not in cells:
                    cells[j] = (_features(r), _verdict(r))
            cursor = start + int(rr[0]["accepted"]) + 1
        if not cells:
            continue
        n = max(cells) + 1
        if output_len is not None:
            n = max(n, min(output_len, n + 1))
        feats: list[TokenFeatures] = []
        match: list[bool] = []
        imputed = 0
        for j in range(n):
            cell = cells.get(j)
            if cell is None:
                cell = pool[rng.randrange(len(pool))]
                imputed += 1
            feats.append(cell[0])
            match.append(cell[1])
        out.append(AcceptanceSeq(feats, match, rid, prompt_len, output_len, imputed))
    return out


def _verdict(r: dict[str, Any]) -> bool:
    if "label" in r and r["label"] is not None:
        return int(r["label"]) == 0
    return int(r["position"]) < int(r["accepted"])


def synthetic_sequences(cfg: AcceptanceCfg, seed: int = 0) -> list[AcceptanceSeq]:
    """A calibrated stand-in for recorded traces: easy/hard stretches of text (a two-state
    Markov chain), matches drawn per state, and features that are noisy, monotone signals of
    the state and the verdict (so a controller has something real to read). The defaults give
    a fixed-k frontier (tokens per target pass / wasted drafted tokens per committed token) of
    k1 1.81/0.10, k2 2.44/0.23, k4 3.39/0.47, k6 4.00/0.75, fitted to the Qwen2.5-Coder
    0.5B -> 1.5B pair's measured frontier (measured greedy, 12 prompts, 64 new tokens: 1.79/0.11, 2.47/0.20,
    3.35/0.44, 3.92/0.70)."""
    rng = random.Random(f"{seed}:synthetic-acceptance")
    pe, ph, stay, share = (cfg.synthetic_easy_accept, cfg.synthetic_hard_accept, cfg.synthetic_stay,
                           cfg.synthetic_easy_share)
    # transition probabilities with stationary easy share `share` and mean run ~1/(1-stay)
    leave_easy = (1 - stay) * 2 * (1 - share)
    leave_hard = (1 - stay) * 2 * share
    out = []
    for s in range(cfg.synthetic_sequences):
        easy = rng.random() < share
        feats, match = [], []
        for _ in range(cfg.synthetic_length):
            ok = rng.random() < (pe if easy else ph)
            conf = (0.86 if easy else 0.5) + (0.06 if ok else -0.14) + rng.gauss(0.0, 0.1)
            top1 = min(0.999, max(0.05, conf))
            second = (1.0 - top1) * rng.uniform(0.35, 0.8)
            rest = max(1e-6, 1.0 - top1 - second)
            entropy = -(top1 * math.log(top1) + second * math.log(max(second, 1e-9))
                        + rest * math.log(rest / 20.0))
            feats.append(TokenFeatures(top1_prob=top1, entropy=entropy, margin=top1 - second,
                                       logit_spread=6.0 + 10.0 * top1 + rng.gauss(0.0, 0.5)))
            match.append(ok)
            if rng.random() < (leave_easy if easy else leave_hard):
                easy = not easy
        out.append(AcceptanceSeq(feats, match, f"synthetic-{s}"))
    return out


BANK_KIND = "wisp-sim-acceptance"


def save_bank(bank: AcceptanceBank, path: str | Path, source: dict[str, Any] | None = None) -> None:
    """Write the per-position sequences of ``bank`` as compact JSON (what ``load_acceptance``
    reads back when ``acceptance.traces`` names a ``.json`` file)."""
    seqs = []
    for s in bank.seqs:
        seqs.append({
            "request_id": s.request_id, "prompt_len": s.prompt_len, "output_len": s.output_len,
            "imputed": s.imputed, "match": "".join("1" if m else "0" for m in s.match),
            "features": [[round(f.top1_prob, 5), round(f.entropy, 5), round(f.margin, 5),
                          round(f.logit_spread, 4)] for f in s.features],
        })
    Path(path).write_text(json.dumps({"kind": BANK_KIND, "schema": 1, "source": source or {},
                                      "sequences": seqs}, separators=(",", ":")))


def load_bank(path: str | Path) -> list[AcceptanceSeq]:
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("kind") != BANK_KIND:
        raise ScenarioError(f"{path}: not an acceptance bank (kind {BANK_KIND!r})")
    out = []
    for s in obj.get("sequences", []):
        feats = [TokenFeatures(top1_prob=a, entropy=b, margin=c, logit_spread=d)
                 for a, b, c, d in s["features"]]
        match = [ch == "1" for ch in s["match"]]
        if len(feats) != len(match):
            raise ScenarioError(f"{path}: a sequence has {len(feats)} features for {len(match)} verdicts")
        out.append(AcceptanceSeq(feats, match, str(s.get("request_id", "")), s.get("prompt_len"),
                                 s.get("output_len"), int(s.get("imputed", 0))))
    return out


def resolve_traces(cfg: AcceptanceCfg) -> Path | None:
    from wisp.sim.server import find_asset

    if cfg.traces and cfg.traces != "auto":
        p = Path(cfg.traces)
        if not p.exists() and (DATA_DIR / cfg.traces).exists():
            p = DATA_DIR / cfg.traces
        if not p.exists():
            raise ScenarioError(f"acceptance.traces = {cfg.traces!r}: no such file")
        return p
    found = find_asset("*trace*.jsonl")
    if found is not None:
        return found
    banks = sorted(DATA_DIR.glob("acceptance-*.json"))
    return banks[0] if banks else None


def scale_acceptance(seqs: Sequence[AcceptanceSeq], target: float, seed: int = 0) -> list[AcceptanceSeq]:
    """The same sequences with matched positions turned into mismatches until the match rate
    is about ``target``: a weaker pair, for the simulator's acceptance axis.

    Position ``i`` with draft confidence ``p_i`` (its ``top1_prob``) that matched is kept with
    probability ``p_i ** g``, one exponent ``g >= 0`` for the whole bank, found by bisection so
    the expected match rate is ``target``; the draws are seeded, so a bank is the same for a
    seed in every mode. Why this keeps the replay plausible: a weaker pair disagrees first where
    the draft was already unsure, so the recorded features keep predicting the verdicts in the
    same direction (lower confidence, more rejections), and runs of agreement on confident
    stretches (boilerplate, closing brackets) survive longer than on uncertain ones, as they do
    between real pairs of different strength. The features are left as recorded, so a learned
    controller trained on the stronger pair is over-confident here: the grid's low-acceptance
    cells err against speculation, not for it."""
    total = sum(len(s) for s in seqs)
    matched = sum(sum(s.match) for s in seqs)
    if not 0.0 < target < 1.0:
        raise ScenarioError(f"acceptance.target_rate = {target}: use a rate between 0 and 1 "
                            "(0 replays the verdicts as recorded)")
    if total == 0 or target * total >= matched:
        raise ScenarioError(f"acceptance.target_rate = {target} is not below the recorded match rate "
                            f"{matched / max(total, 1):.3f}: scaling only removes agreement")
    probs = [f.top1_prob for s in seqs for f, m in zip(s.features, s.match, strict=True) if m]

    def expected(g: float) -> float:
        return sum(min(max(p, 0.0), 1.0) ** g for p in probs)

    want = target * total
    lo, hi = 0.0, 1.0
    while expected(hi) > want and hi < 1e6:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if expected(mid) > want:
            lo = mid
        else:
            hi = mid
    g = (lo + hi) / 2.0
    rng = random.Random(f"{seed}:acceptance-scale:{target}")
    out: list[AcceptanceSeq] = []
    for s in seqs:
        match = [m and rng.random() < min(max(f.top1_prob, 0.0), 1.0) ** g
                 for f, m in zip(s.features, s.match, strict=True)]
        out.append(AcceptanceSeq(list(s.features), match, s.request_id, s.prompt_len, s.output_len,
                                 s.imputed))
    return out


def load_acceptance(cfg: AcceptanceCfg, seed: int = 0) -> AcceptanceBank:
    """The acceptance bank of a scenario: recorded traces (``source = traces``, or ``auto``
    when a trace file is found), else the synthetic model; scaled to ``target_rate`` if set."""
    bank = _load_bank(cfg, seed)
    if cfg.target_rate:
        scaled = scale_acceptance(bank.seqs, cfg.target_rate, seed)
        return AcceptanceBank(scaled, bank.source, bank.path, scaled_to=cfg.target_rate)
    return bank


def _load_bank(cfg: AcceptanceCfg, seed: int) -> AcceptanceBank:
    if cfg.source in ("auto", "traces"):
        path = resolve_traces(cfg)
        if path is not None:
            if path.suffix == ".json":
                seqs = load_bank(path)
            else:
                rows, meta = read_trace_rows(path)
                seqs = sequences_from_rows(rows, meta, seed)
            if seqs:
                return AcceptanceBank(seqs, "traces", str(path))
            if cfg.source == "traces":
                raise ScenarioError(f"{path}: no usable trace rows")
        elif cfg.source == "traces":
            raise ScenarioError("acceptance.source = traces but no trace file was found: record one "
                                "with `wisp-cli trace record` or set acceptance.traces")
    return AcceptanceBank(synthetic_sequences(cfg, seed), "synthetic")


# ---------------------------------------------------------------------- lengths
@dataclass(frozen=True)
class RequestShape:
    prompt_len: int
    output_len: int
    seq: int = -1
    """Index of the acceptance sequence to replay (-1: any)."""


def _cap(cfg: WorkloadCfg, prompt: int, output: int) -> tuple[int, int]:
    p = max(1, min(cfg.max_prompt_tokens, prompt))
    o = max(cfg.min_output_tokens, min(cfg.max_new_tokens, output))
    return p, o


def sharegpt_shapes(cfg: WorkloadCfg) -> list[RequestShape]:
    from wisp.data import load_prompts

    out = []
    for p in load_prompts("sharegpt", cfg.prompts):
        if p.ref_output_chars is None:
            continue
        prompt = math.ceil(len(p.text) / cfg.chars_per_token) + cfg.template_tokens
        output = math.ceil(p.ref_output_chars / cfg.chars_per_token)
        out.append(RequestShape(*_cap(cfg, prompt, output)))
    return out


def mixed_shapes(cfg: WorkloadCfg) -> list[RequestShape]:
    """``wisp-cli bench``'s prompts (``mixed_prompts``: HumanEval, MT-Bench, ShareGPT in turn);
    outputs run to ``max_new_tokens`` unless a ShareGPT reference answer is shorter."""
    from wisp.data import mixed_prompts

    out = []
    for p in mixed_prompts(cfg.prompts):
        prompt = math.ceil(len(p.text) / cfg.chars_per_token) + cfg.template_tokens
        ref = p.ref_output_chars
        output = math.ceil(ref / cfg.chars_per_token) if ref is not None else cfg.max_new_tokens
        out.append(RequestShape(*_cap(cfg, prompt, output)))
    return out


def synthetic_shapes(cfg: WorkloadCfg, seed: int = 0, n: int = 2000) -> list[RequestShape]:
    rng = random.Random(f"{seed}:lengths")

    def draw(mean: float, cv: float) -> int:
        sigma = math.sqrt(math.log(1 + cv * cv))
        return int(round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))

    return [RequestShape(*_cap(cfg, draw(cfg.prompt_mean, cfg.prompt_cv),
                               draw(cfg.output_mean, cfg.output_cv))) for _ in range(n)]


def trace_shapes(cfg: WorkloadCfg, bank: AcceptanceBank) -> list[RequestShape]:
    out = []
    for i, s in enumerate(bank.seqs):
        prompt = s.prompt_len if s.prompt_len is not None else int(cfg.prompt_mean)
        output = s.output_len if s.output_len is not None else len(s) + 1
        out.append(RequestShape(*_cap(cfg, prompt, output), seq=i))
    return out


def load_shapes(cfg: WorkloadCfg, bank: AcceptanceBank, seed: int = 0) -> tuple[list[RequestShape], str]:
    """The request-shape table and where it came from.

    A named data set that cannot be read is a ``ScenarioError`` naming `wisp-cli data prepare`:
    it used to fall back to log-normal lengths with only a note in the report, so a sweep that
    claimed ShareGPT lengths could silently have run on synthetic ones. Synthetic lengths are
    used only when the scenario asks for them (``workload.source = "synthetic"``)."""
    if cfg.source == "traces":
        if bank.source != "traces":
            raise ScenarioError("workload.source = traces needs recorded traces (acceptance.source)")
        return trace_shapes(cfg, bank), "traces"
    if cfg.source in ("sharegpt", "mixed"):
        what = "ShareGPT" if cfg.source == "sharegpt" else "HumanEval/MT-Bench/ShareGPT"
        try:
            shapes = sharegpt_shapes(cfg) if cfg.source == "sharegpt" else mixed_shapes(cfg)
        except (FileNotFoundError, OSError) as err:
            raise ScenarioError(
                f"workload.source = {cfg.source!r} needs the {what} data package, which is not "
                f"installed ({_one_line(err)}): run `wisp-cli data prepare`, or set "
                f"workload.source = 'synthetic' for log-normal lengths") from None
        except ValueError as err:
            raise ScenarioError(
                f"workload.source = {cfg.source!r}: {_one_line(err)} (workload.prompts = {cfg.prompts}; "
                f"run `wisp-cli data prepare` or lower workload.prompts)") from None
        if not shapes:
            raise ScenarioError(f"workload.source = {cfg.source!r}: the {what} data has no usable "
                                f"prompt with a reference answer; run `wisp-cli data prepare`")
        return shapes, f"{cfg.source} ({len(shapes)} prompts)"
    if cfg.source != "synthetic":
        raise ScenarioError(f"workload.source = {cfg.source!r}: use sharegpt, mixed, traces or synthetic")
    return synthetic_shapes(cfg, seed), "synthetic"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def fixed_k_frontier(bank: AcceptanceBank,
                     ks: Sequence[int] = (1, 2, 3, 4, 5, 6)) -> dict[int, tuple[float, float]]:
    """Replay every sequence with a fixed draft length ``k``: (committed tokens per target
    pass, wasted drafted tokens per committed token), the measured frontier of the packaged pair
    (a wasted token is a drafted one that was not accepted)."""
    out = {}
    for k in ks:
        passes = committed = wasted = 0
        for s in bank.seqs:
            m = s.match
            n = len(m)
            pos = 0
            while pos < n:
                a = 0
                while a < k and pos + a < n and m[pos + a]:
                    a += 1
                drafted = min(k, n - pos)
                passes += 1
                committed += a + 1
                wasted += drafted - a
                pos += a + 1
        out[k] = (committed / passes, wasted / committed)
    return out
