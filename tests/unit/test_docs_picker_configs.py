"""Every picker configuration shown in docs/picker.md and docs/flowcontrol.md loads as it is (a reader copies
them whole), and the check refuses a broken one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from inferoute.clock import SystemClock
from inferoute.epp.config import parse_config
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.plugin import PluginDeps
from inferoute.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"


def picker_configs() -> list[tuple[str, str]]:
    """(doc:line, text) of each YAML block that is a picker configuration (not another Kubernetes kind)."""
    out = []
    for name in ("picker.md", "flowcontrol.md"):
        text = (DOCS / name).read_text()
        for m in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M):
            doc = yaml.safe_load(m.group(1))
            if isinstance(doc, dict) and doc.get("kind", "EndpointPickerConfig") == "EndpointPickerConfig":
                out.append((f"{name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


CONFIGS = picker_configs()


def _load(text: str, source: str) -> None:
    parse_config(text, deps=PluginDeps(LocalLearnedState(), SystemClock()), source=source)


def test_the_docs_show_picker_configs() -> None:
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize(("where", "text"), CONFIGS, ids=[w for w, _ in CONFIGS])
def test_every_shown_config_loads(where: str, text: str) -> None:
    _load(text, where)


def test_a_fragment_would_be_refused() -> None:
    with pytest.raises(ConfigError, match="pluginRef: 'queue-scorer' is not a defined plugin"):
        _load("schedulingProfiles:\n- {name: default, plugins: [{pluginRef: queue-scorer}]}\n", "fragment")
