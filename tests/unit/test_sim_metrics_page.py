"""The simulator's cached /metrics page: rendered again exactly when something it shows changed, and always
the same samples as a fresh render (no sockets, no sleeps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferoute.sim.config import SimConfig
from inferoute.sim.engine import Engine, SimRequest
from inferoute.sim.metrics import EngineCollector, MetricsPage, engine_fingerprint, engine_registry


def samples(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_page_renders_again_only_on_change_and_matches_a_fresh_render() -> None:
    wall = [100.0]
    e = Engine(SimConfig(model="m", kv_cache_blocks=100, lora_adapters=("a", "b"), max_loras=1))
    cached = CollectorRegistry(auto_describe=False)
    cached.register(EngineCollector(e, lora_info=False))
    page = MetricsPage(e, cached, lambda: engine_fingerprint(e), wall_clock=lambda: wall[0])

    def check() -> None:
        fresh = generate_latest(engine_registry(e, wall_clock=lambda: wall[0]))
        assert samples(page.body()) == samples(fresh)

    check()
    assert page.renders == 1
    wall[0] = 101.0  # only the LoRA info's value (the wall clock) moves: no new render, yet the new value
    check()
    assert page.renders == 1
    e.submit(SimRequest("1", "a", list(range(40)), 5, 5, lora="a"), 0.0)  # a waiting request
    check()
    assert page.renders == 2
    renders = page.renders
    while (t := e.next_event_time()) is not None:  # every step changes a counter or a histogram
        e.advance(t)
        check()
        assert page.renders == renders + 1
        renders = page.renders
    for _ in range(3):  # idle again
        check()
    assert page.renders == renders
