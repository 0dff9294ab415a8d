"""Request body parsing: msgspec (``parse_body``) and the large-body path (``BodyParser``) give the same
answers, errors included."""

from __future__ import annotations

import json
import random

import pytest

import inferoute.epp.requestcontrol.parse as parse_mod
from inferoute.epp.requestcontrol.parse import BodyParser, ParsedBody, parse_body
from inferoute.epp.requestcontrol.spans import member_value
from inferoute.errors import InferouteError


def outcome(parse: object, body: bytes) -> tuple[object, ...]:
    assert callable(parse)
    try:
        return ("ok", parse(body))
    except InferouteError as exc:
        return ("error", exc.status, exc.message, exc.param)


@pytest.fixture
def every_body_is_large(monkeypatch: pytest.MonkeyPatch) -> BodyParser:
    monkeypatch.setattr(parse_mod, "SIMD_MIN_BODY", 0)
    return BodyParser()


CASES = [
    b'{"model":"m","prompt":"hello"}',
    b' {\n "model" : "m" ,\t"messages" : [ {"role":"user","content":"a \\"quoted\\" }]{ text"} ] , '
    b'"stream" : true , "stream_options": {"include_usage": true}, "max_tokens": 8 }\n',
    b'{"messages":[{"content":"x"}],"model":"m","prompt":null}',  # prompt wins, and is null
    b'{"model":"m","input":"\\\\","prompt_x":1}',  # a string ending in an escaped backslash
    b'{"model":"m","prompt":[1,2,3],"tools":[{"a":{"b":["}","]"]}}],"n":-1.5e3,"s":false}',
    b'{"model":"m","stream":"yes","prompt":"p"}',  # stream only when true
    b'{"model":"a","model":"b","prompt":"p"}',  # duplicate: the last one, as msgspec
    b'{"mod\\u0065l":"m","prompt":"p"}',  # an escaped key
    b'{"model":"m","prompt":"p","x":12345678901234567890123}',  # beyond simdjson's integers
    b'\xef\xbb\xbf{"model":"m","prompt":"p"}',  # a byte-order mark: refused, as msgspec does
    b'{"model":"","prompt":"p"}',
    b'{"model":1,"prompt":"p"}',
    b'{"prompt":"p"}',
    b'["model"]',
    b'{"model":"m","prompt":"p"',
    b'{"model":"m","prompt":"\xff"}',
    b"{}",
]


@pytest.mark.parametrize("body", CASES)
def test_large_body_path_agrees_with_msgspec(every_body_is_large: BodyParser, body: bytes) -> None:
    assert outcome(every_body_is_large.parse, body) == outcome(parse_body, body)


def test_large_body_path_agrees_on_random_documents(every_body_is_large: BodyParser) -> None:
    rng = random.Random(7)
    pieces = ["a", '"', "\\", "}", "]", "{", "[", ":", ",", "é", "model"]

    def value(depth: int) -> object:
        roll = rng.random()
        if depth < 3 and roll < 0.15:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        if depth < 3 and roll < 0.3:
            return {"".join(rng.choices(pieces, k=3)): value(depth + 1) for _ in range(rng.randint(0, 3))}
        return rng.choice([1, -0.5, True, None, "".join(rng.choices(pieces, k=rng.randint(0, 12)))])

    taken = 0
    for _ in range(1500):
        keys = rng.sample(["model", "prompt", "messages", "input", "stream", "tools", "n"], rng.randint(1, 7))
        doc = {k: ("m" if k == "model" and rng.random() < 0.8 else value(0)) for k in keys}
        text = json.dumps(doc, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode()
        assert outcome(every_body_is_large.parse, text) == outcome(parse_body, text), text
        taken += every_body_is_large._large(text) is not None
    assert taken > 500  # the fast path was really exercised


def test_member_value_cuts_without_reading_the_value() -> None:
    body = b'{"model": "m", "messages": [' + b'{"content": "' + b"x" * 100_000 + b'"}], "stream": true}'
    view = member_value(body, 1, 3, b"messages", steps=20)
    assert view is not None and view.obj is body  # a view, not a copy
    raw = view.tobytes()
    assert raw.startswith(b"[{") and raw.endswith(b'"}]') and len(raw) == 100_017
    assert member_value(body, 1, 3, b"prompt", steps=20) is None  # not the key expected there
    assert member_value(body, 1, 3, b"messages", steps=1) is None  # over budget: the caller decodes


def test_big_bodies_take_the_simdjson_path() -> None:
    prompt = "word " * 30_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True})
    parser = BodyParser()
    parsed = parser.parse(body.encode())
    assert parsed == parse_body(body.encode())
    assert parsed == ParsedBody("m", json.dumps([{"role": "user", "content": prompt}]).encode(), True)
    assert parser._large(body.encode()) is not None


def test_body_buffers_other_than_bytes_take_the_msgspec_path() -> None:
    body = json.dumps({"model": "m", "prompt": "p" * 70_000}).encode()
    parser = BodyParser()
    for buffer in (bytearray(body), memoryview(body)):
        assert parser.parse(buffer) == parse_body(body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "the request body is empty"),
        (b"  \n", "the request body is empty"),
        (b"{", "ends before the JSON value is complete"),
        (b"nope", "not valid JSON"),
    ],
)
def test_an_unparsable_body_gets_a_clear_message(body: bytes, words: str) -> None:
    with pytest.raises(InferouteError) as info:
        parse_body(body)
    assert info.value.status == 400 and words in info.value.message
    assert "truncated" not in info.value.message


def _depth(value: object) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","x":' + b"[" * 5 + b"]" * 5 + b"}",
        b'{"model":"m","x":[{"a":[{},[]]},{"b":{"c":[[1]]}}],"y":{"z":[]}}',
        b'{"model":"m","s":"[[[[{{{{ \\" ]]]","t":[["\\\\"]]}',  # brackets in strings do not nest
        b'{"model":"m","x":[[],[[]],[[[]]],[[[[]]]]]}',
        b"[[[]]]",
        b"[]",
    ],
)
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 5, 6, 7])
def test_nested_deeper_than_counts_like_a_decoder(body: bytes, limit: int) -> None:
    depth = _depth(json.loads(body))
    assert parse_mod.nested_deeper_than(body, limit) == (depth > limit)


def test_nested_deeper_than_on_random_documents() -> None:
    rng = random.Random(7)

    def value(level: int) -> object:
        kind = rng.random()
        if level > 9 or kind < 0.3:
            return rng.choice([1, "a]", "{b", None, '"[', "\\"])
        if kind < 0.65:
            return [value(level + 1) for _ in range(rng.randrange(4))]
        return {f"k{i}[": value(level + 1) for i in range(rng.randrange(4))}

    for _ in range(300):
        doc = {"model": "m", "x": value(1)}
        body = json.dumps(doc).encode()
        depth = _depth(doc)
        for limit in range(depth - 2, depth + 2):
            assert parse_mod.nested_deeper_than(body, limit) == (depth > limit), (body, limit)


@pytest.mark.parametrize("large", [False, True])
def test_nesting_past_the_limit_is_400_and_at_the_limit_parses(large: bool) -> None:
    limit = parse_mod.MAX_JSON_DEPTH
    pad = "p" * (parse_mod.SIMD_MIN_BODY if large else 1)

    def body(depth: int) -> bytes:
        inner = "[" * (depth - 1) + "]" * (depth - 1)
        return f'{{"model":"m","prompt":"{pad}","x":{inner}}}'.encode()

    for parse in (parse_body, BodyParser().parse):
        assert parse(body(limit)).model == "m"
        for depth in (limit + 1, 1000, 100_000):
            with pytest.raises(InferouteError) as info:
                parse(body(depth))
            assert info.value.status == 400 and f"deeper than {limit} levels" in info.value.message


def test_invalid_nesting_is_a_400_either_way() -> None:
    """Unbalanced or unterminated input: too deep when its openings alone say so, else the parser's 400."""
    deep = b'{"model":"m","x":' + b"[" * 300
    assert parse_mod.nested_deeper_than(deep, 128)
    for body in (b'{"model":"m","x":' + b"]" * 300 + b"}", b'{"a":"[[[[' * 50):
        assert not parse_mod.nested_deeper_than(body, 128)
        with pytest.raises(InferouteError) as info:
            parse_body(body)
        assert info.value.status == 400 and "not valid JSON" in info.value.message
