"""What every route shares: the server's settings, its Prometheus metrics, and `ServerState` on `app.state`.

    state = ServerState(engine, tokenizer, ServerConfig(model_name="nano")); app.state.server = state
    state = server_state(request)          # in a route

`ServerState` holds the engine (on its thread), the tokenizer, the end-of-turn ids the text side hides, the
token text/bytes caches (logprobs) and the bound used to refuse an over-long prompt before tokenizing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from glm5.serve.async_engine import AsyncEngine

MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerConfig:
    model_name: str = "glm5"
    default_max_tokens: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    chat_template: str | None = None  # a Jinja chat template (the checkpoint's); None: glm5.chat.render_messages
    responses_store_items: int = 1024  # stored Responses API responses (previous_response_id) at most
    responses_store_bytes: int = 64 << 20  # and their JSON at most; least recently used evicted first


class Metrics:
    """Prometheus metrics in a registry of their own (several servers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glm5_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("glm5_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("glm5_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("glm5_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("glm5_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.running = Gauge("glm5_num_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("glm5_num_requests_waiting", "sequences waiting", registry=r)
        self.cache_usage = Gauge("glm5_kv_cache_usage", "fraction of KV cache blocks in use", registry=r)
        self.accept_length = Gauge("glm5_spec_decode_mean_accept_length",
                                   "MTP speculation: tokens per verifying step (1 + accepted drafts)", registry=r)
        self.step_seconds = Histogram("glm5_engine_step_seconds", "engine step time", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))

    def update_gauges(self, llm) -> None:
        """Running / waiting / cache usage read from the engine now. Called after each engine step and on every
        scrape, so an idle server reports 0 running rather than the last busy step's count. (Reads of list
        lengths and a counter: safe from another thread, at worst one step stale.)"""
        self.running.set(llm.num_running)
        self.waiting.set(llm.num_waiting)
        bm = llm.block_manager
        self.cache_usage.set(1 - bm.num_free_blocks / bm.num_blocks)
        if llm.drafter is not None:
            self.accept_length.set(llm.stats.mean_accept_length)


class ServerState:
    """The engine, the tokenizer and what the routes derive from them, built once per app."""

    def __init__(self, engine: AsyncEngine, tokenizer, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = tokenizer
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.hidden_ids = set(tokenizer.eos_token_ids)  # end-of-turn ids: end the text, never part of it
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        backend = getattr(tokenizer, "backend", None)
        self._byte_level = type(backend and backend.decoder).__name__ == "ByteLevel"
        # the most UTF-8 bytes one token stands for (its vocabulary string is at least as long in UTF-8): a
        # prompt of B bytes has at least B / this many tokens, so a prompt far too long is refused untokenized
        vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else {}
        self.max_token_bytes = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=64)

        def on_step(outputs, seconds):
            self.metrics.step_seconds.observe(seconds)
            self.metrics.generation_tokens.inc(sum(len(o.new_token_ids) for o in outputs))
            self.metrics.update_gauges(self.llm)

        engine.on_step = on_step

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the engine takes (validate_prompt's limit)."""
        return min(self.llm.max_model_len, self.llm.capacity_tokens) - 1

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own UTF-8 bytes (OpenAI's `bytes`): also for a token holding part of a character."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            piece = self.tokenizer.id_to_token(token_id) if self._byte_level else None
            if piece is not None and all(ch in BYTE_DECODER for ch in piece):
                raw = [BYTE_DECODER[ch] for ch in piece]
            else:
                raw = list(self.token_text(token_id).encode("utf-8", "replace"))
            self._token_bytes[token_id] = raw
        return raw


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode) back to the bytes it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_DECODER = _byte_decoder()
