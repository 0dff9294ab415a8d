"""The precise prefix plugins by the reference's names: config wiring, the local tokenizers (a tiny Hugging
Face tokenizer built here, no download), render answers, and scoring from the KV-event index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_epp_rig import cand, ctx
from tokenizers import Tokenizer, models, pre_tokenizers

from inferoute.clock import FakeClock
from inferoute.epp.config import parse_config
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.plugin import PluginDeps
from inferoute.epp.precise.tokenize import (
    HFTokenizer,
    Prompt,
    SimTokenizer,
    parse_prompt,
    parse_prompt_value,
    render_token_ids,
)
from inferoute.epp.scheduling.plugins.precise_prefix_producer import PrecisePrefixProducer
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from inferoute.epp.scheduling.plugins.token_producer import TokenProducer
from inferoute.errors import InferouteError
from inferoute.kvevents.wire import BlockStored
from inferoute.sim.tokenizer import encode, render_chat

DEPS = PluginDeps(LocalLearnedState(), FakeClock(), 1)
VOCAB = ["[UNK]", "<|", "|>", "user", "assistant", "hello", "world", "again", "bye"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def config(producer_params: str, scorer: str = "precise-prefix-cache-producer") -> str:
    return f"""
plugins:
- type: token-producer
- type: precise-prefix-cache-producer
  parameters: {producer_params}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: {scorer}}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 2}}, {{pluginRef: max-score-picker}}]
"""


@pytest.fixture
def hf_files(tmp_path: Path) -> tuple[str, str]:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    return str(path), str(template)


def test_reference_config_wires_the_scorer_to_the_producer() -> None:
    cfg = parse_config(config("{tokenProcessorConfig: {blockSize: 4}}"), deps=DEPS)
    producer = cfg.plugins["precise-prefix-cache-producer"]
    scorer = cfg.plugins["prefix-cache-scorer"]
    assert isinstance(producer, PrecisePrefixProducer) and isinstance(scorer, PrefixCacheScorer)
    assert scorer.producer is producer and producer.index.block_size == 4
    assert isinstance(cfg.plugins["token-producer"], TokenProducer)
    assert producer.pool.settings.socket_port == 5557 and producer.pool.settings.topic_filter == "kv@"

    # the index says b holds the first two 4-token blocks of this prompt: b scores 2/3
    prompt = "hello world hello world again bye hello world again bye and more"
    tokens = encode(prompt)
    assert len(tokens) // 4 == 3
    producer.index.apply_events("b", [BlockStored((1, 2), None, tuple(tokens[:8]), 4)], "m")
    c = ctx("m", json.dumps(prompt).encode())
    assert scorer.score(c, [cand("a"), cand("b")]) == [0.0, pytest.approx(2 / 3)]
    # request tokens from a token producer win over local tokenization
    c.request.token_ids = [*tokens[:4], 9, 9, 9, 9]
    assert scorer.score(c, [cand("a"), cand("b")]) == [0.0, 0.5]


@pytest.mark.parametrize("speculative", [True, False])
def test_speculative_indexing_holds_the_picked_prefix_until_the_ttl(speculative: bool) -> None:
    clock = FakeClock(10.0)
    flag = str(speculative).lower()
    cfg = parse_config(
        config(
            f"{{tokenProcessorConfig: {{blockSize: 4}}, speculativeIndexing: {flag}, speculativeTTL: 2s}}"
        ),
        deps=PluginDeps(LocalLearnedState(), clock, 1),
    )
    prompt = json.dumps("hello world hello world again bye hello world again bye and more").encode()
    pool = [cand("a"), cand("b"), cand("c")]
    first = cfg.scheduler.schedule(ctx("m", prompt), list(pool)).endpoints[0].key
    clock.advance(1.9)  # no event yet: the server is still prefilling
    again = cfg.scheduler.schedule(ctx("m", prompt), list(pool))
    if speculative:
        assert again.endpoints[0].key == first and again.scores[first] > 0.0
        assert sum(again.scores.values()) == again.scores[first]
    else:
        assert again.scores == {"a": 0.0, "b": 0.0, "c": 0.0}
    clock.advance(2.1)  # every speculative entry has expired
    assert cfg.scheduler.schedule(ctx("m", prompt), list(pool)).scores == {"a": 0.0, "b": 0.0, "c": 0.0}
    producer = cfg.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixProducer) and producer.index.size() == 0  # events are the truth


@pytest.mark.parametrize(
    ("params", "scorer", "words"),
    [
        ("{}", "nope", "prefixMatchInfoProducerName: 'nope' is not a prefix-match producer"),
        ("{kvEventsConfig: {zmqEndpoint: 'tcp://*:5557'}}", "precise-prefix-cache-producer", "zmqEndpoint"),
        (
            "{speculativeIndexing: true, speculativeTTL: 0s}",
            "precise-prefix-cache-producer",
            "TTL: must be > 0",
        ),
        ("{speculativeTTL: soon}", "precise-prefix-cache-producer", "speculativeTTL: expected a duration"),
        ("{localTokenizer: huggingface}", "precise-prefix-cache-producer", "tokenizerFile: required"),
        ("{tokenProcessorConfig: {blockSize: 0}}", "precise-prefix-cache-producer", "blockSize"),
        ("{kvEventsConfig: {topicFiltre: x}}", "precise-prefix-cache-producer", "unknown parameter"),
    ],
)
def test_config_errors_name_the_key(params: str, scorer: str, words: str) -> None:
    with pytest.raises(InferouteError, match=words):
        parse_config(config(params, scorer), deps=DEPS)


def test_approximate_producer_name_keeps_the_approximate_index() -> None:
    text = config("{}", "approx-prefix-cache-producer").replace(
        "- type: token-producer", "- type: token-producer\n- type: approx-prefix-cache-producer"
    )
    scorer = parse_config(text, deps=DEPS).plugins["prefix-cache-scorer"]
    assert isinstance(scorer, PrefixCacheScorer) and scorer.producer is None


def test_hugging_face_tokenizer_with_chat_template(hf_files: tuple[str, str]) -> None:
    file, template = hf_files
    hf = HFTokenizer(file, Path(template).read_text())
    assert hf.encode(Prompt("m", text="hello world bye")) == [5, 6, 8]
    chat = Prompt("m", messages=(("user", "hello again"),))
    assert hf.encode(chat) == [1, 3, 2, 5, 7, 1, 4, 2]
    cfg = parse_config(
        config(f"{{localTokenizer: huggingface, tokenizerFile: {file}, chatTemplateFile: {template}}}"),
        deps=DEPS,
    )
    producer = cfg.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixProducer)
    messages = json.dumps([{"role": "user", "content": "hello again"}]).encode()
    assert list(producer.tokens(ctx("m", messages))) == [1, 3, 2, 5, 7, 1, 4, 2]
    with pytest.raises(InferouteError, match="cannot load"):
        parse_config(config("{localTokenizer: huggingface, tokenizerFile: /nonexistent.json}"), deps=DEPS)


def test_prompt_parsing_and_render_answers() -> None:
    chat = parse_prompt(b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}')
    assert chat == Prompt("m", messages=(("user", "hi"),))
    assert SimTokenizer().encode(chat) == encode(render_chat([("user", "hi")]))
    assert parse_prompt(b'{"model":"m","prompt":["one"]}') == Prompt("m", text="one")
    assert parse_prompt(b'{"model":"m","prompt":[1,2]}') == Prompt("m", token_ids=(1, 2))
    assert parse_prompt(b'{"model":"m","prompt":[["a"],["b"]]}') is None
    assert parse_prompt(b"not json") is None
    assert parse_prompt_value(b'"text"', "m") == Prompt("m", text="text")
    assert parse_prompt_value(b'[{"role":"system","content":"x"}]', "m") == Prompt(
        "m", messages=(("system", "x"),)
    )
    for member, raw in (
        ("prompt", b'"text"'),
        ("prompt", b'["one"]'),
        ("prompt", b"[1,2]"),
        ("prompt", b'[["a"],["b"]]'),
        ("messages", b'[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url"}]}]'),
        ("messages", b'[{"content":"no role"}]'),
    ):  # the member alone parses as the whole body does
        body = b'{"model":"m","' + member.encode() + b'":' + raw + b"}"
        assert parse_prompt_value(raw, "m") == parse_prompt(body), raw
    assert parse_prompt_value(b"", "m") is None and parse_prompt_value(b"{", "m") is None
    assert render_token_ids({"prompt_token_ids": [1, 2]}) == [1, 2]
    assert render_token_ids([{"token_ids": [3]}]) == [3]
    assert render_token_ids({"tokens": "x"}) is None
