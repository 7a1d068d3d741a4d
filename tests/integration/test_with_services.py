"""``with_services``, the one harness of every command that runs work on a system of its own:
the services are ready inside the block and gone after it (embedded Redis removed), a service
that ends under the block stops the block with ``ServicesStopped`` instead of leaving it
waiting, and the bare Redis hop chain the null-model bench compares against runs."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from wisp.bench import raw_hop_chain
from wisp.services.runner import ServicesStopped, with_services
from wisp.settings import Settings

ROLES = ("estimator", "scheduler")  # no model to load: the harness is what is tested


async def test_services_are_ready_inside_the_block_and_gone_after() -> None:
    async with with_services(Settings(), ROLES) as system:
        assert [s.role for s in system.services] == list(ROLES)
        assert all(s.ready for s in system.services)
        assert system.settings.redis_url == system.url
        assert await system.bus.redis.ping()
        assert set(await system.bus.live("estimator"))
        # start-up's heap is out of the collector's reach while they serve (no 200 ms pauses)
        assert gc.get_freeze_count() > 10_000
        services = system.services
    assert all(s.stopping.is_set() for s in services)
    assert gc.get_freeze_count() == 0  # and collectable again once they are gone
    client = aioredis.from_url(system.url, socket_connect_timeout=1)
    with pytest.raises(RedisConnectionError):  # the embedded server is gone
        await client.ping()
    await client.aclose()


async def test_a_service_that_ends_under_the_block_raises_services_stopped() -> None:
    with pytest.raises(ServicesStopped):
        async with with_services(Settings(), ROLES) as system:
            system.services[0].stop()
            await asyncio.sleep(30)  # cancelled by the harness long before this


async def test_an_error_in_the_block_stops_the_services_and_propagates() -> None:
    with pytest.raises(KeyError):
        async with with_services(Settings(), ROLES) as system:
            services = system.services
            raise KeyError("boom")
    assert all(s.stopping.is_set() for s in services)


async def test_raw_hop_chain_measures_round_periods(redis_url: str, namespace: str) -> None:
    periods = await raw_hop_chain(redis_url, f"{namespace}:raw", devices=2, duration_s=0.5, warmup_s=0.1)
    assert len(periods) > 4 and all(p > 0 for p in periods)
    assert os.getloadavg()  # the bench reports it beside the figures



def test_the_heap_is_given_back_when_the_last_freezer_stops() -> None:
    """Two systems in one process (tests, benchmarks): the first to stop leaves the other's
    heap frozen; the last gives it back; a thaw nobody froze for changes nothing."""
    from wisp.services.runner import freeze_startup_heap, thaw_startup_heap

    freeze_startup_heap()
    freeze_startup_heap()
    thaw_startup_heap()
    assert gc.get_freeze_count() > 0
    thaw_startup_heap()
    assert gc.get_freeze_count() == 0
    thaw_startup_heap()
    freeze_startup_heap()
    assert gc.get_freeze_count() > 0  # the stray thaw did not drive the count below zero
    thaw_startup_heap()
    assert gc.get_freeze_count() == 0
