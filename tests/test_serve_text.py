"""The server's text side without a server: JSON-mode state machine, stop strings, incremental detokenization."""

from __future__ import annotations

import json

import pytest
import torch

from glm5.serve.json_mode import JSONPrefixProcessor, advance_text, is_complete
from glm5.serve.text import IncrementalDetokenizer, TextStream
from glm5.tokenizer import default_tokenizer

START = ((), "start", "")


@pytest.mark.parametrize("text", ['{"a":1}', '{"a":[1,2.5,-3e2],"b":{"c":"x\\"y"},"d":true,"e":null}', "{}"])
def test_complete_json_objects_are_accepted_and_complete(text):
    state = advance_text(START, text)
    assert is_complete(state), text
    json.loads(text)


@pytest.mark.parametrize("text", ["[1]", '{"a" 1}', '{"a":tru}x', '{"a":1}}', '{a:1}', '{"a":01x', " {}", '{"a":1,}'])
def test_text_that_is_not_a_json_object_prefix_is_rejected(text):
    state = advance_text(START, text)
    assert state is None or not is_complete(state), text


def test_prefixes_are_accepted_while_incomplete():
    for prefix in ['{', '{"ke', '{"k":', '{"k":[1,', '{"k":"v\\', '{"k":-1.']:
        state = advance_text(START, prefix)
        assert state is not None and not is_complete(state), prefix


def test_json_processor_keeps_only_valid_continuations_then_forces_the_end():
    tok = default_tokenizer()
    end = set(tok.eos_token_ids)
    processor = JSONPrefixProcessor(tok, end)
    logits = torch.zeros(tok.vocab_size)
    allowed = processor([], logits).isfinite().nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)
    done = tok.encode('{"a":1}')
    masked = processor(done, logits)
    assert masked.isfinite().nonzero().flatten().tolist() == [min(end)]


def test_stop_strings_are_cut_and_held_back_while_they_may_still_form():
    tok = default_tokenizer()
    ids = tok.encode("hello world, stop here please")
    stream = TextStream(tok, stop=["stop here"])
    pieces = [stream.push([i], False) for i in ids]
    assert "".join(pieces) == "hello world, " and stream.stopped
    assert not any("stop" in p for p in pieces)


def test_incremental_detokenization_matches_a_full_decode():
    tok = default_tokenizer()
    text = "naïve café — 東京 🙂 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_text_stream_counts_the_ids_a_stop_string_used():
    from glm5.serve.text import TextStream
    from glm5.tokenizer import default_tokenizer

    tok = default_tokenizer()
    head, tail = tok.encode("alpha beta STOP"), tok.encode(" gamma delta")
    stream = TextStream(tok, ["STOP"])
    assert stream.push(head + tail, finished=False) == "alpha beta " and stream.stopped
    assert stream.used == len(head)  # the ids up to the one completing "STOP", not the ones after it
    one = TextStream(tok, ["STOP"])
    one.push(head[:2], finished=False)
    assert one.used == 2 and not one.stopped
