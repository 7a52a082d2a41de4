"""`EngineConfig`: every knob of the inference engine in one dataclass, built once and passed down.

    from glm5.engine import LLM, EngineConfig
    llm = LLM(model, EngineConfig(block_size=16, kv_cache_tokens=8192, num_speculative_tokens=2))
    llm = LLM(model, kv_cache_tokens=8192)                 # keyword arguments still work (they override fields)
    config = EngineConfig.from_args(args)                  # `glm5 serve` and the benchmarks: argparse -> config

`add_arguments(parser)` declares the command-line flags with `dest` equal to the field names, so `from_args`
reads them back by name (no field-by-field copy that can drift). `device` and `dtype` say where the model is
built or loaded (`LLM.from_preset` / `LLM.from_pretrained`, `glm5 serve`); a model handed to `LLMEngine`
directly stays where it is.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("max-autotune", "default")  # glm5.engine.compiled.MODES


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV cache block
    kv_cache_tokens: int = 32768  # size of the latent KV cache in tokens (rounded up to whole blocks)
    max_num_seqs: int = 32  # sequences in the running batch at most
    max_num_batched_tokens: int = 512  # tokens per prefill step (longer prompts are chunked)
    max_model_len: int | None = None  # context length; None: the model's max_position_embeddings
    num_speculative_tokens: int = 0  # MTP draft tokens per decode step (0: off)
    eos_token_ids: list[int] | None = None  # None: the model config's
    cuda_graphs: bool | None = None  # None: on for CUDA; True on a CPU: the static path uncaptured
    cuda_graph_max_tokens: int = 1024  # steps of at most this many padded tokens replay a graph
    compile: bool = False  # CPU: decode steps compiled by inductor (glm5/engine/compiled.py); off: eager
    compile_mode: str = "max-autotune"  # inductor options of the compiled step ("max-autotune" or "default")
    decode_steps: int = 1  # compiled CPU decode: greedy steps per compiled call (glm5/engine/compiled.py)
    device: str | None = None  # where from_preset / from_pretrained / glm5 serve put the model (None: best available)
    dtype: str | None = None  # weights dtype for those ("float32", "bfloat16", "float16"; None: as built / saved)
    threads: int | None = None  # torch threads of the engine thread (server); None: torch's default

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens", "cuda_graph_max_tokens",
                     "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r}: must be a positive integer")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r}: must be an integer >= 2 or None")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0:
            raise ValueError(f"EngineConfig.num_speculative_tokens={self.num_speculative_tokens!r}: must be >= 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype={self.dtype!r}: one of {', '.join(DTYPES)} or None")
        if not isinstance(self.compile, bool):
            raise ValueError(f"EngineConfig.compile={self.compile!r}: must be True or False")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"EngineConfig.compile_mode={self.compile_mode!r}: one of {', '.join(COMPILE_MODES)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"EngineConfig.threads={self.threads!r}: must be a positive integer or None")

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.kv_cache_tokens // self.block_size))

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype) if self.dtype else None

    def replace(self, **changes) -> EngineConfig:
        """A copy with some fields changed (unknown names are a TypeError naming them)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ command line
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
        """The engine's flags (dest = field name). `defaults` overrides a field's default for this command
        (a benchmark that wants a smaller cache, say)."""
        from glm5.cli import int_at_least

        base = EngineConfig(**{k: v for k, v in defaults.items()})

        def default(name):
            return getattr(base, name)

        group = parser.add_argument_group("engine")
        group.add_argument("--dtype", dest="dtype", default=default("dtype"), choices=DTYPES, help="weights dtype")
        group.add_argument("--device", dest="device", default=default("device"),
                           help="cpu / cuda / mps (default: best available)")
        group.add_argument("--max-num-seqs", dest="max_num_seqs", type=int_at_least(1), default=default("max_num_seqs"),
                           help="sequences in the running batch at most")
        group.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int_at_least(1),
                           default=default("max_num_batched_tokens"), help="tokens per prefill step (chunking)")
        group.add_argument("--kv-cache-tokens", dest="kv_cache_tokens", type=int_at_least(1),
                           default=default("kv_cache_tokens"), help="latent KV cache size in tokens")
        group.add_argument("--block-size", dest="block_size", type=int_at_least(1), default=default("block_size"),
                           help="tokens per KV cache block")
        group.add_argument("--max-model-len", dest="max_model_len", type=int_at_least(2), default=default("max_model_len"),
                           help="context length (default: the model's)")
        group.add_argument("--speculative-tokens", dest="num_speculative_tokens", type=int_at_least(0),
                           default=default("num_speculative_tokens"), help="MTP draft tokens per step (0: off)")
        group.add_argument("--threads", dest="threads", type=int_at_least(1), default=default("threads"),
                           help="torch threads for the engine")
        group.add_argument("--enforce-eager", dest="cuda_graphs", action="store_const", const=False,
                           default=default("cuda_graphs"),
                           help="no CUDA graphs (on CUDA, steps of few tokens are replayed from captured graphs by default)")
        group.add_argument("--compile", dest="compile", action="store_true", default=default("compile"),
                           help="CPU: compile the decode steps with torch.compile (inductor); the first step of "
                                "each batch size takes tens of seconds to compile")
        group.add_argument("--compile-mode", dest="compile_mode", choices=COMPILE_MODES, default=default("compile_mode"),
                           help="inductor options of the compiled decode step")
        group.add_argument("--decode-steps", dest="decode_steps", type=int_at_least(1), default=default("decode_steps"),
                           help="with --compile: greedy decode steps per compiled call (tokens then arrive in "
                                "groups of this many; the per-call cost is paid once per group)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> EngineConfig:
        """The config from parsed arguments: every field whose name is an attribute of `args`, then `overrides`."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)
