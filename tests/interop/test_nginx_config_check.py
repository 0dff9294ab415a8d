"""The real NGINX accepts every configuration ``inferoute nginx-config`` generates (``nginx -t``)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from nginx_harness import nginx_binary

from inferoute.integrations.nginx import NginxOptions, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_nginx_config import OPTION_SETS


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_nginx_accepts_the_generated_configuration(opts: NginxOptions, tmp_path: Path) -> None:
    for sub in ("logs", "temp"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(replace(opts, self_contained=True, listen="127.0.0.1:8999")))  # -t binds nothing
    done = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
