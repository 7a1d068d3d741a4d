"""Every message that crosses a Redis stream, one module per direction.

request: client → drafter · draft: drafter → estimator → scheduler · batch: scheduler → verifier ·
verdict: verifier → drafter · event: drafter → client · stats: verifier → estimator/scheduler ·
cancel: client/gateway → every drafter · dead: any consumer → dead letters ·
session: the session record kept in Redis · load: the scheduler's snapshot for admission ·
trace: drafter → trace recorder (controller training rows, only with tracing on).
"""

from wisp.protocol.base import PROTOCOL_VERSION, ProtocolError, WireModel, decode
from wisp.protocol.batch import VerifyBatch
from wisp.protocol.cancel import CancelRequest
from wisp.protocol.dead import DeadLetter
from wisp.protocol.draft import AnnotatedBlock, DraftBlock, WireDist, WireFeatures, digest_ids
from wisp.protocol.event import OUTPUT_ADAPTER, DoneEvent, ErrorEvent, TokenEvent
from wisp.protocol.load import LoadSnapshot, ServerCostsWire, VerifierLoadWire
from wisp.protocol.request import ChatMessage, GenerateRequest
from wisp.protocol.session import SessionState, SessionTerms
from wisp.protocol.stats import TimingSample
from wisp.protocol.trace import TraceRow
from wisp.protocol.verdict import Verdict

__all__ = [
    "OUTPUT_ADAPTER",
    "PROTOCOL_VERSION",
    "AnnotatedBlock",
    "CancelRequest",
    "ChatMessage",
    "DeadLetter",
    "DoneEvent",
    "DraftBlock",
    "ErrorEvent",
    "GenerateRequest",
    "LoadSnapshot",
    "ServerCostsWire",
    "ProtocolError",
    "SessionState",
    "SessionTerms",
    "TimingSample",
    "TokenEvent",
    "TraceRow",
    "Verdict",
    "VerifierLoadWire",
    "VerifyBatch",
    "WireDist",
    "WireFeatures",
    "WireModel",
    "decode",
    "digest_ids",
]
