"""Every key of the gateway YAML, walked from the config's own structs: a typo, a wrong type and (for numbers
and keys with a syntax) an impossible value each stop the load with ONE line naming the file and the key."""

from __future__ import annotations

import copy
import itertools
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from inferoute.errors import ConfigError
from inferoute.gateway.config import GatewayConfig, load_config, parse_config

SOURCE = "gw.yaml"

# What a leaf needs around it to be checked at all (a backend needs a remote picker, an endpoint its address).
BASE: dict[str, Any] = {
    "pool": {"endpoints": [{"address": "10.0.0.2", "port": 8000}]},
    "routes": [
        {
            "path": "/v1/",
            "backends": [
                {"epp": {"endpoint": "10.0.0.1:9002"}, "endpoints": [{"address": "10.0.0.1", "port": 8000}]}
            ],
        }
    ],
}

# Impossible values of keys that are strings with a syntax (numbers all get -1).
BAD_STRINGS = {
    "listen": "nowhere",
    "pool.allowed_cidrs[0]": "10.0.0.0/33",
    "pool.endpoints[0].address": "",
    "routes[0].path": "v1",
    "routes[0].default_upstream": "nope",
    "routes[0].bbr.header_name": "X Model",
    "routes[0].bbr.default_model": "a\r\nInjected: 1",
    "routes[0].bbr.endpoint": "grpc://h:1",
    "routes[0].epp.endpoint": "host-only",
    "routes[0].epp.header_name": "",
    "routes[0].backends[0].default_upstream": "1.2.3.4",
    "routes[0].backends[0].epp.endpoint": "embedded",
    "routes[0].backends[0].endpoints[0].address": "",
    "metrics_path": "metrics",
    "pool.app_protocol": "h3",
    "routes[0].epp.body": "streamed",
    "routes[0].backends[0].app_protocol": "https",
    "picker.sync_redis": "localhost:6379",
}


def _unwrap(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _leaves(struct: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, type) of every key that holds a value, lists of structs entered at index 0."""
    for f in msgspec.structs.fields(struct):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = _unwrap(f.type)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            yield from _leaves(tp, path)
        elif typing.get_origin(tp) is list and issubclass(typing.get_args(tp)[0], msgspec.Struct):
            yield from _leaves(typing.get_args(tp)[0], f"{path}[0]")
        elif typing.get_origin(tp) is list:
            yield f"{path}[0]", typing.get_args(tp)[0]
        else:
            yield path, tp


def _parts(path: str) -> list[str | int]:
    return [int(i) if i else k for k, i in re.findall(r"(\w+)|\[(\d+)\]", path)]


def _doc(path: str, value: Any, *, key: str | None = None) -> dict[str, Any]:
    """BASE with ``value`` at ``path`` (or, with ``key``, at that key beside the leaf: a typo)."""
    doc = copy.deepcopy(BASE)
    parts = _parts(path)
    if key is not None:
        parts[-1] = key
    node: Any = doc
    for part, nxt in itertools.pairwise(parts):
        if isinstance(part, int):
            while len(node) <= part:
                node.append({})
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = parts[-1]
    if isinstance(last, int):
        node[last:] = [value]
    else:
        node[last] = value
    return doc


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(doc, SOURCE)
    message = e.value.message
    assert "\n" not in message and message.startswith(f"{SOURCE}: "), message
    return message


LEAVES = list(_leaves(GatewayConfig))


def test_the_base_document_is_valid() -> None:
    parse_config(BASE, SOURCE)
    assert len(LEAVES) > 60


@pytest.mark.parametrize(("path", "tp"), LEAVES, ids=[p for p, _ in LEAVES])
def test_every_key(path: str, tp: Any) -> None:
    parent, _, name = path.rpartition(".")
    if not name.endswith("]") and typing.get_origin(tp) is not dict:
        message = _error(_doc(path, 1, key=name + "x"))
        assert f"{name}x" in message and parent in message.replace("$.", ""), message
    wrong = "abc" if tp in (int, float, bool) else [1]
    message = _error(_doc(path, wrong))
    assert path in message.replace("$.", ""), message
    bad = -1 if tp in (int, float) else BAD_STRINGS.get(path)
    if bad is not None:
        message = _error(_doc(path, bad))
        assert re.sub(r"\[\d+\]$", "", path) in message.replace("$.", ""), message


def test_files_named_in_the_config_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    for key, section in (("ca_file", "epp"), ("cert_file", "bbr"), ("key_file", "epp")):
        other = {"ca_file": "ca.pem"} if key == "ca_file" else {"cert_file": "ca.pem", "key_file": "ca.pem"}
        (tmp_path / "gw.yaml").write_text(
            f"routes: [{{path: /v1/, {section}: {{{', '.join(f'{k}: {v}' for k, v in other.items())}}}}}]\n"
        )
        load_config(tmp_path / "gw.yaml")
        other[key] = "nope.pem"
        (tmp_path / "gw.yaml").write_text(
            f"routes: [{{path: /v1/, {section}: {{{', '.join(f'{k}: {v}' for k, v in other.items())}}}}}]\n"
        )
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / "gw.yaml")
        assert e.value.message == (
            f"{tmp_path / 'gw.yaml'}: routes[0].{section}.{key}: no such file: {tmp_path / 'nope.pem'}"
        )
    (tmp_path / "gw.yaml").write_text("picker: {config_file: .}\n")
    with pytest.raises(ConfigError, match=r"picker.config_file: is a directory"):
        load_config(tmp_path / "gw.yaml")
    assert load_config(tmp_path / "gw.yaml", check_files=False).picker.config_file == str(tmp_path / ".")
