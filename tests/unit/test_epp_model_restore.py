"""ModelRestorer: the asked model name back in the response's ``model`` fields, chunk by chunk."""

from __future__ import annotations

import json
import random

import pytest

from inferoute.epp.requestcontrol.restore import ModelRestorer


def _feed_all(r: ModelRestorer, pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    outs = [r.feed(p) for p in pieces]
    return b"".join(outs) + r.finish(), outs


def test_whole_json_answer_gets_the_asked_name() -> None:
    body = json.dumps({"id": "x", "model": "food-v1", "choices": [{"text": "hi"}]}).encode()
    out = ModelRestorer("food-v1", "food-review").whole(body)
    assert json.loads(out)["model"] == "food-review"
    assert json.loads(out)["choices"] == [{"text": "hi"}]


def test_compact_and_spaced_forms_are_both_restored() -> None:
    r = ModelRestorer("m/v1", "m")
    assert r.whole(b'{"model":"m/v1"}') == b'{"model":"m"}'
    assert r.whole(b'{"model" : "m/v1","x":1}') == b'{"model" : "m","x":1}'


def test_text_inside_strings_and_other_models_stay() -> None:
    r = ModelRestorer("food-v1", "food-review")
    # generated text that happens to contain the pair is escaped JSON: untouched
    body = json.dumps({"model": "food-v1", "text": '{"model":"food-v1"}'}).encode()
    out = json.loads(r.whole(body))
    assert out == {"model": "food-review", "text": '{"model":"food-v1"}'}
    assert r.whole(b'{"model":"food-v10"}') == b'{"model":"food-v10"}'  # a longer name is another model
    assert r.whole(b'{"modelx":"food-v1"}') == b'{"modelx":"food-v1"}'


def test_sse_events_pass_at_once_and_every_chunk_is_restored() -> None:
    r = ModelRestorer("food-v1", "food-review")
    events = [
        b'data: {"id":"1","model":"food-v1","choices":[{"text":"a"}]}\n\n',
        b'data: {"id":"1","model":"food-v1","choices":[{"text":"b"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    for ev in events:
        out = r.feed(ev)
        assert out == ev.replace(b'"food-v1"', b'"food-review"')  # nothing of an event is held back
    assert r.finish() == b""


@pytest.mark.parametrize("seed", range(25))
def test_any_split_of_the_stream_gives_the_same_answer(seed: int) -> None:
    rng = random.Random(seed)
    text = b'"choices":[{"text":"t\\"model\\":\\"org/food-v1\\""}]'
    events = b"".join(
        b'data: {"id":"%d","object":"text_completion","model" : "org/food-v1",%s}\n\n' % (i, text)
        for i in range(6)
    )
    expected = ModelRestorer("org/food-v1", "food").whole(events)
    assert expected.count(b'"model" : "food"') == 6
    assert expected.count(b'\\"model\\":\\"org/food-v1\\"') == 6  # escaped text untouched
    cuts = sorted(rng.sample(range(1, len(events)), 12))
    pieces = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    got, _ = _feed_all(ModelRestorer("org/food-v1", "food"), pieces)
    assert got == expected


def test_held_back_text_is_bounded_without_newlines() -> None:
    r = ModelRestorer("food-v1", "food-review")
    body = json.dumps({"model": "food-v1", "text": "x" * 10_000}).encode()
    out = r.feed(body[:5000])
    assert len(out) >= 5000 - 64  # only a possible start of a pair waits
    rest = r.feed(body[5000:]) + r.finish()
    assert json.loads(out + rest)["model"] == "food-review"
