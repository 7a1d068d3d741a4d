"""`wisp-cli submit` over the OpenAI-compatible HTTP API (the gateway) instead of Redis: what an
ordinary client does, with no broker credential. It streams the answer (server-sent events) and
returns WISP's figures in the shape of a ``DoneEvent``'s fields, so the CLI prints the same
thing whichever path it took."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2 as httpx

from wisp.bus import RequestFailed

__all__ = ["submit_http"]


async def submit_http(base_url: str, prompt: str, *, chat_template: bool, max_new_tokens: int,
                      temperature: float, seed: int | None, ttft_slo_ms: float | None,
                      tpot_slo_ms: float | None, speculation: Any, device: str | None,
                      api_key: str | None, idle_timeout_s: float,
                      on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stream one completion (a one-message chat unless ``chat_template`` is False) and return
    the ``DoneEvent`` fields WISP put in the final chunk's ``wisp`` field. Raises
    ``RequestFailed`` with the server's one-line message on an HTTP or stream error."""
    body: dict[str, Any] = {
        "model": await _model(base_url, api_key, idle_timeout_s), "max_tokens": max_new_tokens,
        "temperature": temperature, "stream": True, "return_token_ids": True,
        "speculation": speculation,
    }
    for name, value in (("seed", seed), ("ttft_slo_ms", ttft_slo_ms), ("tpot_slo_ms", tpot_slo_ms),
                        ("device", device)):
        if value is not None:
            body[name] = value
    if chat_template:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    figures: dict[str, Any] = {}
    finish = "length"
    text: list[str] = []
    timeout = httpx.Timeout(idle_timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        try:
            async with client.stream("POST", base_url.rstrip("/") + path, json=body,
                                     headers=_headers(api_key)) as resp:
                if resp.status_code != 200:
                    raise RequestFailed(_error_of(await resp.aread(), resp.status_code))
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RequestFailed(str(chunk["error"].get("message", chunk["error"])))
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta", {}).get("content") if chat_template
                                 else choice.get("text")) or ""
                        if piece:
                            text.append(piece)
                            if on_text is not None:
                                on_text(piece)
                        finish = choice.get("finish_reason") or finish
                    if "wisp" in chunk:
                        figures = chunk["wisp"]
        except httpx.HTTPError as err:
            raise RequestFailed(f"the API at {base_url} did not answer: {err}") from None
    if "token_ids" not in figures:
        raise RequestFailed("the API's answer carried no figures (is it a WISP gateway?)")
    return {
        "request_id": figures.get("request_id", ""), "text": "".join(text),
        "token_ids": figures["token_ids"], "prompt_token_ids": figures.get("prompt_token_ids", []),
        "finish_reason": finish, "mode": figures.get("mode", ""),
        "ttft_ms": figures.get("ttft_ms", 0.0), "tpot_ms": figures.get("tpot_ms", 0.0),
        "e2e_ms": figures.get("e2e_ms", 0.0), "rounds": figures.get("rounds", 0),
        "drafted_tokens": figures.get("drafted", 0), "accepted_tokens": figures.get("accepted", 0),
        "ttft_slo_ms": ttft_slo_ms, "tpot_slo_ms": tpot_slo_ms, "device": figures.get("device", ""),
        "via": base_url,
    }


async def _model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    """The model id the server lists first (the target's alias)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(min(timeout_s, 30.0))) as client:
        try:
            resp = await client.get(base_url.rstrip("/") + "/models", headers=_headers(api_key))
        except httpx.HTTPError as err:
            raise RequestFailed(f"the API at {base_url} did not answer: {err}") from None
        if resp.status_code != 200:
            raise RequestFailed(_error_of(resp.content, resp.status_code))
        return str(resp.json()["data"][0]["id"])


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_of(raw: bytes, status: int) -> str:
    try:
        return f"{json.loads(raw)['error']['message']} (HTTP {status})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"
