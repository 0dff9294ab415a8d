"""The deterministic tokenizer approximation."""

from __future__ import annotations

import subprocess
import sys

from inferoute.sim.tokenizer import VOCAB_SIZE, Tokenizer, count_tokens, encode, pieces, render_chat

PROSE = (
    "The Gateway API Inference Extension routes each request to the model server replica that will answer "
    "it fastest. It reads queue lengths, cache utilisation and adapter state from every pod, and it keeps "
    "an approximate index of which prompt prefixes each server has cached recently. "
) * 5


def test_same_text_same_ids_and_memo_agrees() -> None:
    t = Tokenizer()
    assert t.encode(PROSE) == t.encode(PROSE) == encode(PROSE)
    assert all(0 <= i < VOCAB_SIZE for i in encode(PROSE))


def test_ids_are_stable_across_processes() -> None:
    # Python's hash() is salted per process; the tokenizer must not depend on it.
    code = "from inferoute.sim.tokenizer import encode; print(encode('hello world, 42 tokens!'))"
    out = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(out) == 1
    assert out.pop().strip() == str(encode("hello world, 42 tokens!"))


def test_about_four_characters_per_token_on_english() -> None:
    ratio = len(PROSE) / count_tokens(PROSE)
    assert 3.5 <= ratio <= 5.5, ratio


def test_pieces() -> None:
    assert pieces("Hello, world!") == ["Hello", ",", " world", "!"]
    assert pieces("2025") == ["2", "0", "2", "5"]
    assert pieces("<|user|>\nhi") == ["<|user|>", "\n", "hi"]
    assert pieces(" internationalization") == [" int", "erna", "tion", "aliz", "ation"]
    assert pieces("Tokenizers are fun") == ["Toke", "nizers", " are", " fun"]  # the tail is a short word
    assert "".join(pieces(PROSE)) == PROSE  # lossless split


def test_prefix_of_text_gives_prefix_of_ids() -> None:
    # Needed for prefix caching: a shared text prefix (ending at a word boundary) shares token ids.
    a = encode("System: be brief.\nUser: what is a KV cache?")
    b = encode("System: be brief.\nUser: what is a GPU?")
    common = encode("System: be brief.\nUser: what is a")
    assert a[: len(common)] == b[: len(common)] == common


def test_chat_template() -> None:
    text = render_chat([("system", "S"), ("user", "U")])
    assert text == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n"
    assert count_tokens(text) == 12  # 5 special tokens, 5 newlines, S, U


def test_memo_is_bounded() -> None:
    t = Tokenizer(max_memo=10)
    ids = t.encode(" ".join(f"w{i}" for i in range(50)))
    assert len(ids) > 10 and len(t._ids) <= 10
