"""EmbeddedPicker lifecycle: failures surface as PickerError, tasks are owned and stopped, metrics exposed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from inferoute.endpoints import Endpoint
from inferoute.epp.assembly import EppOptions, start_picker
from inferoute.picking import Destination, PickerError, PickRequest

BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


async def test_unreachable_pool_still_schedules_blind_then_close(refused_port: Callable[[], int]) -> None:
    registry = CollectorRegistry()
    eps = [Endpoint("a", "127.0.0.1", refused_port()), Endpoint("b", "127.0.0.1", refused_port())]
    picker = await start_picker(EppOptions(endpoints=eps, registry=registry, scrape_timeout=0.2))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not picker.ready():  # "ready" once every endpoint was tried, even unsuccessfully
            assert loop.time() < deadline, "never ready"
            await asyncio.sleep(0.02)
        decision, session = await picker.pick(PickRequest("POST", "/v1/completions", {}, BODY))
        session.aborted("test")
        assert isinstance(decision, Destination) and decision.endpoints[0] in {e.key for e in eps}
        text = generate_latest(registry).decode()
        assert "inferoute_epp_stale_fallback_total 1.0" in text
        assert 'inference_pool_ready_pods{name="default"} 0.0' in text
        assert len(picker.collector._scrapers) == 2
    finally:
        await picker.aclose()
    assert len(picker.collector._scrapers) == 0 and len(picker.collector.tasks) == 0
    assert len(picker._tasks) == 0
    assert not picker.ready()
    with pytest.raises(PickerError, match="closed"):
        await picker.pick(PickRequest("POST", "/v1/completions", {}, BODY))
    # the pool collector was unregistered: the registry can host a new picker
    again = await start_picker(EppOptions(endpoints=eps, registry=registry))
    await again.aclose()


async def test_a_plugin_bug_is_a_picker_error_not_a_crash(refused_port: Callable[[], int]) -> None:
    picker = await start_picker(EppOptions(endpoints=[Endpoint("a", "127.0.0.1", refused_port())]))
    try:

        def broken(*args: object) -> None:
            raise ZeroDivisionError("plugin bug")

        picker.director.scheduler.schedule = broken  # type: ignore[method-assign,assignment]
        with pytest.raises(PickerError, match="plugin bug") as e:
            await picker.pick(PickRequest("POST", "/v1/completions", {}, BODY))
        assert e.value.cause == "picker-internal"
    finally:
        await picker.aclose()
