"""``program-aware-fairness``: Least Attained Service (LAS) per fairness id ("program").

Service of a program = input tokens + 2 x output tokens of its finished requests, decayed with half-life
``lasHalfLifeSeconds`` (so a program that was heavy a few minutes ago is not punished forever). Among the
band's non-empty flows the one with the lowest score goes next::

    score = lasWeightService * service / max(service) - lasWeightHeadWait * headWait / max(headWait)

(head wait = how long the flow's head item has been queued), so light programs go first and a long-waiting
head gains priority. Programs idle for ``evictionTtlSeconds`` are forgotten (swept at most every
``evictionSweepSeconds``). Parameters: ``strategy`` las, ``lasWeightService`` 0.8, ``lasWeightHeadWait``
0.2, ``lasHalfLifeSeconds`` 60, ``evictionTtlSeconds`` 3600, ``evictionSweepSeconds`` 300.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.flowcontrol.types import Flow

TYPE = "program-aware-fairness"


class ProgramAwareFairness:
    type_name = TYPE

    def __init__(
        self,
        name: str = TYPE,
        *,
        weight_service: float = 0.8,
        weight_head_wait: float = 0.2,
        half_life: float = 60.0,
        eviction_ttl: float = 3600.0,
        eviction_sweep: float = 300.0,
    ) -> None:
        self.name = name
        self.weight_service = weight_service
        self.weight_head_wait = weight_head_wait
        self.half_life = half_life
        self.eviction_ttl = eviction_ttl
        self.eviction_sweep = eviction_sweep
        self._service: dict[str, tuple[float, float]] = {}
        """fairness id → (service at time t, t)."""
        self._last_sweep = 0.0

    def service(self, fairness_id: str, now: float) -> float:
        s = self._service.get(fairness_id)
        if s is None:
            return 0.0
        value, t = s
        return value * 0.5 ** ((now - t) / self.half_life) if self.half_life > 0 else value

    def record(self, fairness_id: str, input_tokens: int, output_tokens: int, now: float) -> None:
        """A request of ``fairness_id`` finished (the response hook)."""
        self._service[fairness_id] = (
            self.service(fairness_id, now) + input_tokens + 2 * output_tokens,
            now,
        )
        if now - self._last_sweep >= self.eviction_sweep:
            self._last_sweep = now
            for fid in [f for f, (_, t) in self._service.items() if now - t > self.eviction_ttl]:
                del self._service[fid]

    def pick_flow(self, band_priority: int, flows: Sequence[Flow], now: float) -> Flow:
        if len(flows) == 1:
            return flows[0]
        services = [self.service(f.key, now) for f in flows]
        waits = []
        for f in flows:
            head = f.head()
            waits.append(0.0 if head is None else max(0.0, now - head.enqueued_at))
        max_s = max(services) or 1.0
        max_w = max(waits) or 1.0
        best, best_score = flows[0], float("inf")
        for f, s, w in sorted(zip(flows, services, waits, strict=True), key=lambda t: t[0].key):
            score = self.weight_service * s / max_s - self.weight_head_wait * w / max_w
            if score < best_score:
                best, best_score = f, score
        return best

    def jains_index(self, now: float) -> float:
        """Jain's fairness index over the programs' attained service (1.0 = perfectly even)."""
        xs = [self.service(f, now) for f in self._service]
        if not xs or not any(xs):
            return 1.0
        return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
