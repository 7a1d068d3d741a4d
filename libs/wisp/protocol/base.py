"""The wire format shared by every stream message.

Every message is a pydantic v2 model with a ``kind`` tag and a schema ``version``; bytes on the
wire are JSON. Nothing is ever unpickled: a payload that does not validate raises
``ProtocolError`` with a short reason, which the bus turns into a dead letter.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

PROTOCOL_VERSION: Literal[2] = 2
"""2: a session's constants moved off every draft block into ``SessionTerms``."""
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
"""Largest payload a consumer accepts; a draft block is a few KiB, so this only stops abuse."""


class ProtocolError(ValueError):
    """A payload that is not a valid message of the expected kind; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WireModel(BaseModel):
    """Base of every stream message: tagged and versioned, and strict: unknown fields, a string
    where a number belongs (no coercion) and NaN or infinite floats are all refused, so a
    malformed message fails here, at the consumer's door, rather than deep in a handler."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    KIND: ClassVar[str] = "message"

    version: Literal[2] = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """JSON bytes for the wire."""
        return self.model_dump_json().encode()


M = TypeVar("M", bound=BaseModel)


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = "" if err.error_count() <= 3 else f" (+{err.error_count() - 3} more)"
    return "; ".join(parts) + more


def decode(model: type[M], raw: bytes | str | None) -> M:
    """Parse ``raw`` JSON as ``model``; raise ``ProtocolError`` with a readable reason."""
    if raw is None:
        raise ProtocolError("missing payload field")
    size = len(raw)
    if size > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        version = _peek_version(raw)
        if version is not None and version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"unsupported protocol version {version!r} (this build speaks {PROTOCOL_VERSION})"
            ) from None
        raise ProtocolError(f"invalid {model.__name__}: {_short(err)}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"undecodable payload: {err}") from None


def _peek_version(raw: bytes | str) -> Any:
    import json

    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj.get("version") if isinstance(obj, dict) else None
