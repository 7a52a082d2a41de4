"""The tokenizer: GLM-5 specials are single ids that ordinary text never produces; train, save, load, cache.

    .venv/bin/python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.tokenizer import EOS_TOKENS, SPECIAL_TOKENS, Tokenizer, default_tokenizer, train_tokenizer

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. def main(argv):\n    return 0\n"
    "Ünïcödé text, 日本語のテキスト, emoji 🙂 and numbers 1234567890.\n"
)


@pytest.fixture(scope="module")
def default_tok(tmp_path_factory):
    """The default tokenizer, built once into a private cache so the test sees a real first build."""
    cache = tmp_path_factory.mktemp("glm5-cache")
    previous = os.environ.get("GLM5_CACHE")
    os.environ["GLM5_CACHE"] = str(cache)
    try:
        yield default_tokenizer()
    finally:
        if previous is None:
            os.environ.pop("GLM5_CACHE", None)
        else:
            os.environ["GLM5_CACHE"] = previous


@pytest.fixture(scope="module")
def small_tok():
    lines = [SAMPLE_TEXT * 3, "tool calls and reasoning " * 50, "<think>literal tags in training text</think>"]
    return train_tokenizer(iter(lines * 20), vocab_size=400)


def test_default_tokenizer_has_exactly_the_nano_vocab_size(default_tok):
    assert default_tok.vocab_size == 4096, f"the nano model has 4096 embeddings, tokenizer has {default_tok.vocab_size}"


def test_specials_are_appended_as_the_last_ids_in_documented_order(default_tok):
    expected = {name: 4096 - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert default_tok.special_tokens == expected
    assert default_tok.eos_token_ids == [expected[n] for n in EOS_TOKENS]
    assert default_tok.pad_token_id == expected["<|endoftext|>"]


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_each_special_is_one_id_only_when_specials_are_allowed(default_tok, name):
    text = f"a{name}b"
    special_id = default_tok.special_token_id(name)
    with_special = default_tok.encode(text, allow_special=True)
    assert with_special.count(special_id) == 1, f"{name} should be one token with allow_special: {with_special}"
    plain = default_tok.encode(text)
    assert not set(plain) & set(default_tok.special_tokens.values()), f"ordinary text gave special ids: {plain}"
    assert default_tok.decode(plain) == text


@settings(deadline=None, max_examples=150)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=12),
                          st.sampled_from(["<", "|", ">", "<|", "|>", "</", "think", "tool_call", " "])),
                max_size=12))
def test_ordinary_text_never_encodes_to_a_special_and_round_trips(default_tok, pieces):
    text = "".join(pieces)
    ids = default_tok.encode(text)
    leaked = set(ids) & set(default_tok.special_tokens.values())
    assert not leaked, f"{text!r} encoded to special ids {leaked}"
    assert default_tok.decode(ids) == text, "decode(encode(text)) differs from text"
    assert default_tok.decode(default_tok.encode(text, allow_special=True)) == text


def test_decode_can_skip_specials(default_tok):
    ids = default_tok.encode("<|user|>hello<|assistant|>", allow_special=True)
    assert default_tok.decode(ids, skip_special_tokens=True) == "hello"
    assert default_tok.decode(ids) == "<|user|>hello<|assistant|>"


def test_unknown_special_name_is_a_clear_key_error(default_tok):
    with pytest.raises(KeyError, match="no special token"):
        default_tok.special_token_id("<|nope|>")


def test_default_tokenizer_is_cached_and_not_rebuilt(default_tok, monkeypatch):
    import glm5.tokenizer as module

    assert default_tokenizer() is default_tok, "a second call in the same process should reuse the object"
    module._load_or_build_default.cache_clear()  # now only the disk cache can help
    monkeypatch.setattr(module, "train_tokenizer", lambda *a, **k: pytest.fail("rebuilt despite the cache"))
    again = default_tokenizer()
    assert again.backend.to_str() == default_tok.backend.to_str(), "cached tokenizer differs from the first build"
    cached = [p.name for p in module.cache_dir().iterdir()]
    assert any(name.startswith("tokenizer-4096-") for name in cached), f"no cache entry in {cached}"


def test_training_is_deterministic():
    lines = [SAMPLE_TEXT] * 30
    first = train_tokenizer(iter(lines), 350).backend.to_str()
    second = train_tokenizer(iter(lines), 350).backend.to_str()
    assert first == second, "two trainings on the same text gave different tokenizers"


def test_training_rejects_a_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 273"):
        train_tokenizer(iter(["abc"]), 100)


def test_training_from_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.txt"], 400)


def test_save_and_load_round_trip(small_tok, tmp_path):
    small_tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and "[gMASK]" in config["chat_template"]
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.special_tokens == small_tok.special_tokens
    assert loaded.encode(SAMPLE_TEXT) == small_tok.encode(SAMPLE_TEXT)
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").vocab_size == small_tok.vocab_size


def test_transformers_loads_the_saved_tokenizer_with_the_same_ids(small_tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    small_tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "<|user|>" + SAMPLE_TEXT + "<think>"
    assert hf.encode(text, add_special_tokens=False) == small_tok.encode(text, allow_special=True)


def test_glm5_layout_specials_are_found_by_name_not_by_id(small_tok, tmp_path):
    """GLM-5's tokenizer.json has the specials high up, in its own order, among other added tokens."""
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(small_tok.backend.to_str())
    # rebuild with the specials in GLM's block order, among tokens we do not know (added tokens take the
    # ids after the model's vocabulary, in the order listed)
    data = json.loads(backend.to_str())
    data["added_tokens"] = []
    base = max(data["model"]["vocab"].values()) + 1
    glm_order = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<think>", "</think>", "<tool_call>",
                 "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>",
                 "</arg_value>"]
    for offset, name in enumerate(glm_order):
        data["added_tokens"].append({"id": base + offset, "content": name, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    glm = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert set(glm.special_tokens) == set(SPECIAL_TOKENS), f"missing: {set(SPECIAL_TOKENS) - set(glm.special_tokens)}"
    assert glm.special_token_id("<|user|>") == base + 7 != small_tok.special_token_id("<|user|>")
    assert glm.eos_token_ids == [base, base + 7, base + 9]
    assert glm.pad_token_id == base
    assert glm.encode("<think>", allow_special=True) == [base + 11]
    assert base + 11 not in glm.encode("<think>")


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    from glm5.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 40)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert Tokenizer.from_file(out).vocab_size == 300
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_flags_all_have_help():
    from glm5.cli import build_parser

    parser = build_parser()
    tokenizer_parser = parser._subparsers._group_actions[0].choices["tokenizer"]
    for name, sub in tokenizer_parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"glm5 tokenizer {name}: {action.option_strings or action.dest} has no help"
