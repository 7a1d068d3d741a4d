"""The estimator: annotates each draft block with its predicted verification cost and keeps
the verify-time model fitted to the verifiers' measured timings (online refit), publishing the
model as versioned JSON under ``wisp:estimator:model`` for the scheduler to reload."""

from __future__ import annotations

import logging
import time
from typing import Any

from wisp.bus import Bus, Entry
from wisp.policy.estimator import BatchShape, SpeedNormalizer, VerifyTimeEstimator, round_shape
from wisp.policy.learned_estimator import default_estimator
from wisp.protocol import AnnotatedBlock, DraftBlock, TimingSample
from wisp.service import Consumer, Service, now
from wisp.settings import Settings
from wisp.telemetry import ESTIMATOR_ERROR

log = logging.getLogger(__name__)

GROUP = "estimator"
LEARN_PACE_S = 0.05
"""Batch timings are learned in reads at most 20 times a second (``Consumer.pace_s``): no
request waits on them, and a level refit every 4 samples loses nothing by coming 50 ms later."""


def block_shape(b: DraftBlock) -> BatchShape:
    """A round alone (``round_shape``: a first round is priced as the prefill it is)."""
    new, ctx = round_shape(len(b.draft_tokens), b.base_committed_len, b.generated_len)
    return BatchShape.of([new], [ctx])


class EstimatorService(Service):
    role = "estimator"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        name: str | None = None,
        *,
        estimator: VerifyTimeEstimator | None = None,
    ) -> None:
        super().__init__(settings, bus, name)
        # the learned model fitted on the shipped profile of this target (else LinearEstimator)
        self.estimator = estimator or default_estimator(settings)
        self.published_version = -1
        self.abs_pct_errors: list[float] = []
        self.speeds = SpeedNormalizer()

    def heartbeat_info(self) -> dict[str, Any]:
        return {**super().heartbeat_info(), "model_version": self.estimator.version}

    async def setup(self) -> None:
        await self._publish_if_changed()  # the starting model, for the scheduler and admission

    async def _publish_if_changed(self) -> None:
        if self.estimator.version != self.published_version:
            await self.bus.set_value(self.keys.estimator_model, self.estimator.to_json())
            self.published_version = self.estimator.version

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(self.keys.draft, GROUP, DraftBlock, batch=self.annotate_all, reclaim=True),
            # timings of batches verified before this group existed are not replayed ("$")
            Consumer(self.keys.stats, GROUP, TimingSample, batch=self.learn_all, start="$",
                     reclaim=True, pace_s=LEARN_PACE_S),
        ]

    def annotated(self, e: Entry[DraftBlock]) -> AnnotatedBlock:
        return AnnotatedBlock(
            block=e.msg,
            predicted_verify_ms=self.estimator.predict(block_shape(e.msg)),
            model_key=self.estimator.model_key,
            model_scale=self.estimator.model_scale,
            annotated_ts=now(),
        )

    async def annotate(self, e: Entry[DraftBlock]) -> None:
        await self.bus.publish(self.keys.annotated, self.annotated(e))

    async def annotate_all(self, entries: list[Entry[DraftBlock]]) -> None:
        """Annotate every block read together and publish them in one round trip (the base
        retries a failed batch entry by entry)."""
        if len(entries) == 1:
            await self.annotate(entries[0])
            return
        await self.bus.publish_many([(self.keys.annotated, self.annotated(e)) for e in entries])

    async def learn_all(self, entries: list[Entry[TimingSample]]) -> None:
        """Learn from every timing read, then publish the model once if it changed."""
        for e in entries:
            self.learn(e)
        await self._publish_if_changed()

    def learn(self, e: Entry[TimingSample]) -> None:
        s = e.msg
        if s.new_tokens:
            shape = BatchShape.of(s.new_tokens, s.context_lens)
            predicted = self.estimator.predict(shape)
            # on the fastest verifier's scale: a slower verifier's times must not teach the shared
            # model that big batches are slow (SpeedNormalizer)
            measured = self.speeds.normalize(s.verifier, predicted, s.measured_ms)
            if measured > 0:
                err = abs(predicted - measured) / measured
                self.abs_pct_errors.append(err)
                ESTIMATOR_ERROR.observe(err)
                del self.abs_pct_errors[:-1000]
            self.estimator.observe(shape, measured, time.monotonic())  # paces shape refits

    @property
    def mape(self) -> float:
        errs = self.abs_pct_errors
        return sum(errs) / len(errs) if errs else float("nan")
