"""The token prefix cache gives the tokens and keys a full tokenization gives, doing less of it."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_epp_rig import ctx
from tokenizers import Tokenizer, models, pre_tokenizers

from inferoute.epp.precise.index import PreciseIndex, request_keys
from inferoute.epp.precise.prefixcache import TokenPrefixCache
from inferoute.epp.precise.tokenize import HFTokenizer, LocalTokenizer, Prompt, SimTokenizer

WORDS = ["hello", "world", "again", "bye", "internationalization", "42", "x", "!?", "  ", "\n", "é"]


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", "\t"]) for _ in range(n))


def keys_fn(index: PreciseIndex, model: str):  # type: ignore[no-untyped-def]
    def keys(tokens: Sequence[int], parent: int | None) -> list[int]:
        return request_keys(tokens, index.block_size, index.root(model) if parent is None else parent)

    return keys


@pytest.fixture
def hf(tmp_path: Path) -> HFTokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["sim", "hf"])
@pytest.mark.parametrize("seed", range(4))
def test_cached_tokenization_equals_a_full_one(kind: str, seed: int, hf: HFTokenizer) -> None:
    tokenizer: LocalTokenizer = SimTokenizer() if kind == "sim" else hf
    rng = random.Random(seed)
    index = PreciseIndex(4)
    cache = TokenPrefixCache(4, block_chars=32, capacity=200)
    prefixes = [text(rng, rng.randrange(5, 120)) for _ in range(4)]
    for _ in range(60):
        model = rng.choice(["m", "other"])
        prompt = Prompt(model, text=rng.choice(prefixes) + text(rng, rng.randrange(0, 30)))
        full_text, special = tokenizer.text(prompt)
        got = cache.tokenize(full_text, special, model, tokenizer.encode_text, keys_fn(index, model))
        want = tokenizer.encode(prompt)
        assert got.tokens == want
        assert got.keys == index.keys_for(want, model)
        assert len(got.ends) == len(want) and (not want or got.ends[-1] <= len(full_text))
    assert cache.hits > 20 and cache.reused_tokens > 0 and len(cache._blocks) <= 200


def test_the_producer_keys_repeat_prefixes_from_the_cache() -> None:
    from inferoute.epp.precise.subscriber import SubscriberSettings
    from inferoute.epp.scheduling.plugins.precise_prefix_producer import PrecisePrefixProducer

    producer = PrecisePrefixProducer("p", PreciseIndex(16), SubscriberSettings(), SimTokenizer())
    system = "You are a careful assistant. " * 200
    for question in ["What is two plus two?", "Name a colour.", "Why is the sky blue?"]:
        c = ctx("m", json.dumps(system + question).encode())
        tokens = SimTokenizer().encode(Prompt("m", text=system + question))
        assert producer.keys(c) == producer.index.keys_for(tokens, "m")
    cache = producer.token_cache
    assert (cache.misses, cache.hits) == (1, 2) and cache.reused_tokens > 2 * 1000
