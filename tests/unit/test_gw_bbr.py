"""BBR model extraction and size limits (pure)."""

from __future__ import annotations

import json

import pytest

from inferoute.epp.requestcontrol.parse import SIMD_MIN_BODY, BodyParser, ParsedBody
from inferoute.errors import InferouteError
from inferoute.gateway.bbr import BodyLimit, check_declared_length, model_or_default


def model(
    body: bytes, ctype: str | None = "application/json", parser: BodyParser | None = None
) -> str | None:
    """The model header BBR sets (``d``: the default model)."""
    return model_or_default(body, ctype, "d", parser or BodyParser())[0]


_CASES = [
    (b'{"model": "llama-3"}', "llama-3"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "m", "stream": true}', "m"),
    (b'  {"model":"with spaces ok"}  ', "with spaces ok"),
    ('{"model": "модель-ü"}'.encode(), "модель-ü"),
    (b'{"model": "a\\"b"}', 'a"b'),
    (b'{"nested": {"model": "inner"}, "model": "outer"}', "outer"),
    (b'{"nested": {"model": "inner"}}', None),
    (b'{"Model": "case"}', None),
    (b'{"model": null}', None),
    (b'{"model": ""}', None),
    (b'{"model": 3}', None),
    (b'{"model": true}', None),
    (b'{"model": ["a"]}', None),
    (b'{"model": {"name": "a"}}', None),
    (b'["model", "x"]', None),
    (b'"model"', None),
    (b'{"model": "x",}', None),
    (b'{"model": "x"', None),
    (b'{"model": "x"} trailing', None),
    (
        b'{"model": "x", "other": [1, 2,]}',
        None,
    ),  # invalid anywhere = invalid: the decode validates it all
    (b"\xff\xfe", None),
    (b"", None),
]


@pytest.mark.parametrize(("body", "expected"), _CASES)
def test_model_from_the_body_else_the_default(body: bytes, expected: str | None) -> None:
    assert model(body) == (expected if expected is not None or not body else "d")


def test_model_from_a_large_body() -> None:
    doc = {"messages": [{"role": "user", "content": "w " * 1000}] * 2000, "model": "big"}
    body = json.dumps(doc).encode()
    assert len(body) > 4_000_000
    assert model(body) == "big"
    assert model(body[:-1]) == "d"


def test_the_parse_is_handed_on_with_the_model() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    found, parsed = model_or_default(body, "application/json", "d", BodyParser())
    assert found == "m" and isinstance(parsed, ParsedBody)
    assert (parsed.model, bytes(parsed.prompt), parsed.stream) == (
        "m",
        b'[{"role": "user", "content": "hi"}]',
        True,
    )
    found, parsed = model_or_default(b'{"model": 3}', "application/json", "d", BodyParser())
    assert found == "d" and isinstance(parsed, InferouteError) and parsed.status == 400  # the picker's 400
    assert model_or_default(body, "text/plain", "d", BodyParser()) == ("d", None)  # not parsed at all
    assert model_or_default(b"", None, "d", BodyParser()) == (None, None)


@pytest.mark.parametrize(
    ("ctype", "body", "expected"),
    [
        ("application/json", b'{"model": "m"}', "m"),
        ("application/json; charset=utf-8", b'{"model": "m"}', "m"),
        ("application/vnd.api+json", b'{"model": "m"}', "m"),
        (None, b'{"model": "m"}', "m"),
        ("text/plain", b'{"model": "m"}', "default"),
        ("multipart/form-data; boundary=x", b'{"model": "m"}', "default"),
        ("application/json", b"not json", "default"),
        ("application/json", b"", None),
        (None, b"", None),
    ],
)
def test_model_or_default(ctype: str | None, body: bytes, expected: str | None) -> None:
    assert model_or_default(body, ctype, "default", BodyParser())[0] == expected


def test_declared_length_checked_up_front() -> None:
    assert check_declared_length({}, 10) is None
    assert check_declared_length({"content-length": "10"}, 10) == 10
    with pytest.raises(InferouteError) as e:
        check_declared_length({"Content-Length": "11"}, 10)
    assert e.value.status == 413 and e.value.cause == "body-too-large"
    with pytest.raises(InferouteError) as e:
        check_declared_length({"content-length": "-1"}, 10)
    assert e.value.status == 400


def test_body_limit_while_reading() -> None:
    lim = BodyLimit(10)
    lim.feed(6)
    lim.feed(4)
    with pytest.raises(InferouteError) as e:
        lim.feed(1)
    assert e.value.status == 413


def test_model_with_control_characters_is_refused() -> None:
    from inferoute.gateway.bbr import is_header_safe

    assert is_header_safe("llama-3 8b\t(v1)") and not is_header_safe("a\r\nb") and not is_header_safe("a\x00")
    with pytest.raises(InferouteError) as e:
        model(b'{"model": "a\\nb"}')
    assert (e.value.status, e.value.cause, e.value.param) == (400, "bad-model", "model")


_EDGE_BODIES = [
    b'{"model": "a", "model": "b"}',  # duplicate keys: the last wins (as Python's json on the model server)
    b'{"model": null, "model": "b"}',
    b'{"model": "a", "model": 3}',
    b'{"x": "\xff\xfe", "model": "bad-utf8-elsewhere"}',
    b'{"x": "\\ud800", "model": "lone-surrogate-elsewhere"}',
    b'{"x": 123456789012345678901234567890, "model": "big-int-elsewhere"}',
    b'{"x": 1e999, "model": "huge-float-elsewhere"}',
    b'{"x": ' + b"[" * 1500 + b"]" * 1500 + b', "model": "deep"}',
    b'{"model": "tab\\tin-it"}',
    b'{"model": "raw\x01control"}',
]


@pytest.mark.parametrize("body", [*(b for b, _ in _CASES if b), *_EDGE_BODIES])
def test_the_large_body_path_agrees(body: bytes) -> None:
    padded = b" " * SIMD_MIN_BODY + body  # leading whitespace: the same document, on the simdjson path
    parser = BodyParser()
    assert model(padded, parser=parser) == model(body, parser=parser)


def test_too_deep_a_document_is_the_default_model_not_a_crash() -> None:
    body = b'{"x": ' + b"[" * 1500 + b"]" * 1500 + b', "model": "deep"}'
    found, parsed = model_or_default(body, "application/json", "d", BodyParser())
    assert found == "d" and isinstance(parsed, InferouteError) and parsed.status == 400


def test_one_parser_on_a_large_body_and_after_it() -> None:
    parser = BodyParser()
    doc = {"messages": [{"role": "user", "content": "w " * 1000}] * 600, "model": "big"}
    body = json.dumps(doc).encode()
    assert model(body, parser=parser) == "big"
    assert model(body[:-1], parser=parser) == "d"
    assert model(b'{"model": "small"}', parser=parser) == "small"  # the reused parser is not confused
    assert model(b" " * SIMD_MIN_BODY + b'{"model": "again"}', parser=parser) == "again"
