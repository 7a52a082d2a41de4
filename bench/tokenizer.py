"""Tokenizer and output-parser throughput: glm5's wrapper against the raw `tokenizers` library, same text.

    .venv/bin/python bench/tokenizer.py            # prints a table, writes bench/results/tokenizer.json
    .venv/bin/python bench/tokenizer.py --repeats 9 --megabytes 2

Measures (medians of --repeats runs):
- encode / decode MB/s of one long document, and encode of a batch of documents (the Rust side runs a
  batch on all cores), for `glm5.tokenizer.Tokenizer` and for `tokenizers.Tokenizer` loaded from the
  same tokenizer.json; the ratio shows what the wrapper costs;
- the cold build of the default tokenizer (into a throwaway cache);
- StreamingParser fed one token at a time (tokens/s) on a long reasoning + content + tool-call output,
  and parse_output on the whole text.
It is a benchmark: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizers  # noqa: E402
from results_io import write_results  # bench/ is on sys.path when a bench runs

from glm5.chat import StreamingParser, parse_output  # noqa: E402
from glm5.tokenizer import _load_or_build_default, default_corpus, default_tokenizer  # noqa: E402


def median_seconds(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_text(megabytes: float) -> str:
    """Standard-library text the default tokenizer did not train on (the corpus after its first 3 MB)."""
    texts = default_corpus(max_bytes=int((3 + megabytes) * 1_000_000))
    whole = "".join(texts)
    return whole[3_000_000:]


def agent_output(turns: int) -> str:
    """A long GLM-5 assistant output: reasoning, then content and tool calls, repeated."""
    reasoning = "I need the forecast for several cities; the user wants metric units and a short answer. " * 4
    calls = "".join(
        f"<tool_call>get_weather<arg_key>city</arg_key><arg_value>City number {i} — Zürich</arg_value>"
        f"<arg_key>days</arg_key><arg_value>{i % 7}</arg_value><arg_key>opts</arg_key>"
        f"<arg_value>{{\"metric\": true, \"hours\": [6, 12, 18]}}</arg_value></tool_call>"
        for i in range(turns)
    )
    return reasoning * turns + "</think>Here is what I found so far. " * turns + calls


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "opts": {"type": "object"}}}}}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of the text to encode and decode")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenizer.json"),
                        help="where to write the JSON results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("GLM5_CACHE")
        os.environ["GLM5_CACHE"] = cache
        start = time.perf_counter()
        ours = default_tokenizer()
        build_seconds = time.perf_counter() - start
        _load_or_build_default.cache_clear()  # time the load from the disk cache, not the in-process memo
        start = time.perf_counter()
        default_tokenizer()
        cached_seconds = time.perf_counter() - start
        if previous is None:
            os.environ.pop("GLM5_CACHE")
        else:
            os.environ["GLM5_CACHE"] = previous
        raw = tokenizers.Tokenizer.from_str(ours.backend.to_str())

    text = benchmark_text(args.megabytes)
    megabytes = len(text.encode("utf-8")) / 1e6
    documents = text.split("\n\n")
    ids = ours.encode(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids, "wrapper and raw library disagree on ids"

    rows = []

    def compare(name, ours_fn, raw_fn, amount, unit):
        # alternate the two, one run each per round, so a busy moment on the machine hits both alike
        ours_fn(), raw_fn()  # warm-up
        ours_times, raw_times = [], []
        for _ in range(args.repeats):
            ours_times.append(median_seconds(ours_fn, 1, warm_up=False))
            raw_times.append(median_seconds(raw_fn, 1, warm_up=False))
        ours_s, raw_s = statistics.median(ours_times), statistics.median(raw_times)
        rows.append({"measure": name, "unit": unit, "glm5": amount / ours_s, "tokenizers": amount / raw_s,
                     "ratio": raw_s / ours_s})

    compare("encode, one document", lambda: ours.encode(text),
            lambda: raw.encode(text, add_special_tokens=False).ids, megabytes, "MB/s")
    compare(f"encode, batch of {len(documents)} documents", lambda: ours.encode_batch(documents),
            lambda: [e.ids for e in raw.encode_batch(documents, add_special_tokens=False)], megabytes, "MB/s")
    compare("decode, one document", lambda: ours.decode(ids), lambda: raw.decode(ids), megabytes, "MB/s")

    output = agent_output(200)
    # the text a server hands the parser: each generated id detokenized as it arrives (DecodeStream holds
    # back bytes of a character split across ids, so a few steps yield nothing)
    output_ids = ours.encode(output, allow_special=True)
    detokenizer = tokenizers.decoders.DecodeStream(skip_special_tokens=False)
    pieces = [detokenizer.step(ours.backend, token_id) or "" for token_id in output_ids]
    assert "".join(pieces) == output, "streamed detokenization differs from the text"

    def stream_tokens():
        streaming = StreamingParser(TOOLS)
        for piece in pieces:
            streaming.feed(piece)
        streaming.close()
        return streaming.finish()

    assert stream_tokens() == parse_output(output, TOOLS)
    stream_s = median_seconds(stream_tokens, args.repeats)
    whole_s = median_seconds(lambda: parse_output(output, TOOLS), args.repeats)
    parser_rows = [
        {"measure": "StreamingParser, one token per feed", "tokens": len(pieces), "tokens_per_s": len(pieces) / stream_s},
        {"measure": "parse_output, whole text", "tokens": len(pieces), "tokens_per_s": len(pieces) / whole_s},
    ]

    print(f"text: {megabytes:.2f} MB of stdlib text, {len(ids):,} tokens ({len(text) / len(ids):.2f} chars/token); "
          f"vocab {ours.vocab_size}; {args.repeats} repeats, medians")
    print(f"default tokenizer: cold build {build_seconds:.2f} s, cached load {cached_seconds:.2f} s")
    print(f"{'measure':44} {'glm5':>12} {'tokenizers':>12} {'ratio':>7}")
    for row in rows:
        print(f"{row['measure']:44} {row['glm5']:>8.2f} {row['unit']:>3} {row['tokenizers']:>8.2f} {row['unit']:>3}"
              f" {row['ratio']:>7.3f}")
    for row in parser_rows:
        print(f"{row['measure']:44} {row['tokens_per_s']:>12,.0f} tokens/s ({row['tokens']:,} tokens)")

    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "tokenizers": tokenizers.__version__},
        "text_megabytes": megabytes, "text_tokens": len(ids), "vocab_size": ours.vocab_size, "repeats": args.repeats,
        "default_build_seconds": build_seconds, "default_cached_load_seconds": cached_seconds,
        "tokenizer": rows, "parser": parser_rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
