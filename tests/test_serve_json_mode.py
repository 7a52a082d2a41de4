"""json_object constrained decoding: the closing of any JSON prefix, and objects complete within max_tokens."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.serve.json_mode import JSONPrefixProcessor, advance, advance_text, closing, is_complete

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                          max_leaves=10)
objects = st.dictionaries(st.text(max_size=4), json_value, max_size=4)


@settings(max_examples=300, deadline=None)
@given(obj=objects, data=st.data())
def test_every_prefix_plus_its_closing_is_a_json_object_and_the_closing_shrinks_one_character_at_a_time(obj, data):
    text = json.dumps(obj, separators=(",", ":"))  # compact, with escapes (\\uXXXX, \\n, ...) as json writes them
    cut = data.draw(st.integers(0, len(text)))
    state = advance_text(((), "start", ""), text[:cut])
    assert state is not None, text[:cut]
    rest = closing(state)
    assert isinstance(json.loads(text[:cut] + rest), dict), (text[:cut], rest)
    for i, ch in enumerate(rest):  # the processor's budget rule needs this: each forced character shortens it by one
        state = advance(state, ch)
        assert state is not None and closing(state) == rest[i + 1 :], (text[:cut], rest, i)
    assert is_complete(state)


@pytest.mark.parametrize("edge", ['{"a":1e', '{"a":-', '{"a":"\\u00', '{"a":"\\', '{"a":tr', '{"', '{"a"', '{"a":[',
                                  '{"a":[1,', '{"a":{"b":[{', "{"])
def test_closing_of_edge_states(edge):
    assert isinstance(json.loads(edge + closing(advance_text(((), "start", ""), edge))), dict)


@pytest.mark.parametrize("max_tokens", [3, 4, 7, 15, 30])
def test_random_logits_under_the_processor_give_an_object_closed_within_max_tokens(max_tokens):
    from glm5.tokenizer import default_tokenizer

    tok = default_tokenizer()
    end_ids = set(tok.eos_token_ids)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        processor = JSONPrefixProcessor(tok, end_ids, max_tokens=max_tokens)
        out: list[int] = []
        while len(out) < max_tokens:
            logits = processor(out, torch.randn(tok.vocab_size, generator=gen) * 4)  # a model that wants anything
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            out.append(token)
            if token in end_ids:
                break
        assert out[-1] in end_ids, f"seed {seed}: no end within {max_tokens} tokens: {tok.decode(out)!r}"
        assert isinstance(json.loads(tok.decode(out[:-1])), dict), tok.decode(out)


def test_without_a_budget_nothing_forces_the_end():
    from glm5.tokenizer import default_tokenizer

    tok = default_tokenizer()
    processor = JSONPrefixProcessor(tok, set(tok.eos_token_ids))
    out = tok.encode('{"a":"')
    logits = torch.zeros(tok.vocab_size)
    kept = torch.isfinite(processor(out, logits)).sum().item()
    assert kept == processor.candidates  # the string may go on with any of the most likely tokens
