"""What `wisp-cli status` shows: every stream's length, each consumer group's lag and pending
count, and the live services (from their heartbeats)."""

from __future__ import annotations

from typing import Any

from wisp.bus import Bus


def _s(x: Any) -> Any:
    return x.decode() if isinstance(x, bytes) else x


async def collect(bus: Bus) -> dict[str, Any]:
    r = bus.redis
    ns = bus.keys.ns
    streams: list[dict[str, Any]] = []
    outputs = 0
    async for key in r.scan_iter(match=f"{ns}:*", _type="stream", count=500):
        name = _s(key)
        if name.startswith(f"{ns}:out:"):
            outputs += 1
            continue
        groups = []
        for g in await r.xinfo_groups(name):
            g = {_s(k): _s(v) for k, v in g.items()}
            groups.append({
                "group": g.get("name"),
                "consumers": int(g.get("consumers") or 0),
                "pending": int(g.get("pending") or 0),
                "lag": None if g.get("lag") is None else int(g["lag"]),
            })
        streams.append({"stream": name, "length": int(await r.xlen(name)), "groups": groups})
    streams.sort(key=lambda s: s["stream"])
    services = []
    for role in ("drafter", "verifier", "scheduler", "estimator", "gateway"):
        for name, info in sorted((await bus.live(role)).items()):
            services.append({"role": role, "name": name, **{k: v for k, v in info.items()
                                                            if k not in ("role", "name")}})
    gateways = [s["url"] for s in services if s["role"] == "gateway" and s.get("url")]
    return {
        "namespace": ns,
        "api_url": gateways[0] if gateways else None,
        "streams": streams,
        "output_streams": outputs,
        "services": services,
        "pending_total": sum(g["pending"] for s in streams for g in s["groups"]),
    }


def render(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"streams ({info['namespace']})")
    for col in ("stream", "length", "group", "lag", "pending", "consumers"):
        t.add_column(col, justify="left" if col in ("stream", "group") else "right")
    for s in info["streams"]:
        if not s["groups"]:
            t.add_row(s["stream"], str(s["length"]), "-", "-", "-", "-")
        for i, g in enumerate(s["groups"]):
            t.add_row(s["stream"] if i == 0 else "", str(s["length"]) if i == 0 else "",
                      g["group"], "?" if g["lag"] is None else str(g["lag"]), str(g["pending"]),
                      str(g["consumers"]))
    console.print(t)
    if info.get("api_url"):
        console.print(f"OpenAI-compatible API: {info['api_url']}")
    console.print(f"{info['output_streams']} request output streams; "
                  f"{info['pending_total']} entries pending in all groups")
    s = Table(title="live services")
    for col in ("role", "name", "mode", "ready", "details"):
        s.add_column(col)
    for svc in info["services"]:
        extra = {k: v for k, v in svc.items() if k not in ("role", "name", "mode", "ready", "ts")}
        s.add_row(svc["role"], svc["name"], str(svc.get("mode", "")), str(svc.get("ready", "")),
                  ", ".join(f"{k}={v}" for k, v in extra.items()))
    if not info["services"]:
        console.print("no live services (is `wisp-cli up` running?)")
    else:
        console.print(s)
