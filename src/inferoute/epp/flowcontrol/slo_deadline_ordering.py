"""``slo-deadline-ordering-policy``: deadline = arrival + the request's TTFT SLO (``x-llm-d-slo-ttft-ms``,
alias ``x-slo-ttft-ms``); a missing or invalid header means far future."""

from __future__ import annotations

from inferoute.epp.flowcontrol.types import FAR_FUTURE, FlowItem

TYPE = "slo-deadline-ordering-policy"


class SloDeadlineOrdering:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name

    def key(self, item: FlowItem) -> float:
        return FAR_FUTURE if item.slo_ttft is None else item.enqueued_at + item.slo_ttft
