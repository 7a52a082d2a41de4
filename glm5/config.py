"""GLM5Config: every field of the released GLM-5 `config.json`, validated, with named presets.

    from glm5 import GLM5Config
    cfg = GLM5Config.from_preset("nano")          # trains on a laptop CPU
    cfg = GLM5Config.from_preset("glm5-744b")     # the released model, exactly
    cfg = GLM5Config.from_pretrained("some/dir")  # a Hugging Face config.json (model_type glm_moe_dsa)
    cfg.save_pretrained("out/")                   # writes config.json, unknown keys kept

Field names are the Hugging Face ones (transformers' `GlmMoeDsaConfig`), so a `config.json` round-trips.
Presets below the released size derive every width from one knob, `depth` (see `GLM5Config.from_depth`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "glm_moe_dsa"
SUPPORTED_ROPE_TYPES = ("default", "yarn")
SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_TOPK_METHODS = ("noaux_tc",)
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GLM5Config:
    """The GLM-5 (`glm_moe_dsa`) architecture. Defaults are the released 744B model."""

    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one routed expert (and, times n_shared_experts, the shared one)
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    # MLA
    q_lora_rank: int = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # DSA lightning indexer
    index_topk: int = 2048
    index_n_heads: int = 32
    index_head_dim: int = 128
    indexer_rope_interleave: bool = True
    index_topk_freq: int = 1  # IndexShare: only every freq-th layer (from the offset) runs an indexer
    index_skip_topk_offset: int = 2
    indexer_types: list[str] | None = None  # per layer "full" | "shared"; derived from freq/offset if None
    mlp_layer_types: list[str] | None = None  # per layer "dense" | "sparse"; derived if None
    # MTP
    num_nextn_predict_layers: int = 1
    # misc
    hidden_act: str = "silu"
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # None / {"rope_type": "default"} / {"rope_type": "yarn", "factor": ...}
    initializer_range: float = 0.02
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [154820, 154827, 154829])
    torch_dtype: str = "bfloat16"
    # keys of a config.json we do not model; kept so that save_pretrained writes them back
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()  # before anything below compares or iterates a field
        if self.indexer_types is None:
            self.indexer_types = indexer_pattern(self.num_hidden_layers, self.index_topk_freq, self.index_skip_topk_offset)
        else:
            self.indexer_types = list(self.indexer_types)
        if self.mlp_layer_types is None:
            n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense)
        else:
            self.mlp_layer_types = list(self.mlp_layer_types)
        if isinstance(self.rope_scaling, dict) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) in (
            None,
            "default",
        ):
            self.rope_scaling = None
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """(nope + rope)^-0.5, times mscale^2 under yarn scaling (as transformers / DeepSeek do)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            factor = self.rope_scaling["factor"]
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.mlp_layer_types[layer_idx] == "sparse"

    def has_indexer(self, layer_idx: int) -> bool:
        return self.indexer_types[layer_idx] == "full"

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """ValueError naming the field when a config.json gives an integer or list field a value of the wrong JSON
        type: __post_init__ uses some of them before validate() runs, and validate() compares the ids with <."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind in ("int", "int | None") and not (value is None and kind == "int | None") and (
                    isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"GLM5Config.{f.name}={value!r}: must be an integer")
            if kind.startswith("list[") and value is not None and not isinstance(value, list | tuple):
                raise ValueError(f"GLM5Config.{f.name}={value!r}: must be a list")

    def validate(self) -> None:
        """Raise ValueError naming the field and the rule it breaks."""

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"GLM5Config.{name}={getattr(self, name)!r}: {rule}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "index_n_heads",
            "index_head_dim",
            "max_position_embeddings",
            "index_topk_freq",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "index_skip_topk_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        if not isinstance(self.index_topk, int) or isinstance(self.index_topk, bool) or self.index_topk < 1:
            fail("index_topk", "must be >= 1 (the number of past tokens each query attends to)")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads", f"must be divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.num_key_value_heads != self.num_attention_heads:
            # MLA expands the latent per head; grouped KV heads are not part of this architecture.
            fail("num_key_value_heads", f"must equal num_attention_heads={self.num_attention_heads} (MLA)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.index_head_dim < self.qk_rope_head_dim:
            fail("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (RoPE on its first dims)")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts // self.n_group < 2:
            fail("n_group", "each group needs at least 2 experts (a group scores by its 2 best)")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            fail("num_experts_per_tok", "must be <= topk_group * experts per group (the experts the router may pick)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be <= num_hidden_layers={self.num_hidden_layers}")
        # fields of the released config.json that name a variant this model does not build: refused rather than
        # read and ignored (a checkpoint trained with them would load and give wrong numbers)
        if self.mlp_bias is not False:
            fail("mlp_bias", "must be false: GLM-5's MLPs and experts have no biases (nor do transformers' glm_moe_dsa)")
        if self.indexer_rope_interleave is not True:
            fail("indexer_rope_interleave", "must be true: the indexer's RoPE rotates interleaved pairs, as GLM-5's "
                 "does (the rotate-half form is not implemented)")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            fail("hidden_act", f"must be one of {SUPPORTED_ACTIVATIONS}")
        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            fail("topk_method", f"must be one of {SUPPORTED_TOPK_METHODS}")
        if self.torch_dtype not in SUPPORTED_DTYPES:
            fail("torch_dtype", f"must be one of {SUPPORTED_DTYPES}")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "attention_dropout", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(name, "must be a number")
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", "must be > 0")
        if self.initializer_range < 0:
            fail("initializer_range", "must be >= 0")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", "must be > 0")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be > 0")
        if not 0.0 <= self.attention_dropout < 1.0:
            fail("attention_dropout", "must be in [0, 1)")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                fail("rope_scaling", "must be a dict or None")
            if self.rope_type not in SUPPORTED_ROPE_TYPES:
                fail("rope_scaling", f"unknown rope type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
            if self.rope_type == "yarn" and not (isinstance(self.rope_scaling.get("factor"), int | float) and self.rope_scaling["factor"] >= 1):
                fail("rope_scaling", "yarn needs a numeric factor >= 1")
            original = self.rope_scaling.get("original_max_position_embeddings")
            if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
                fail("rope_scaling", "original_max_position_embeddings must be a positive integer")
        if len(self.indexer_types) != self.num_hidden_layers or set(self.indexer_types) - {"full", "shared"}:
            fail("indexer_types", f"must list 'full' or 'shared' for each of the {self.num_hidden_layers} layers")
        if self.indexer_types and self.indexer_types[0] != "full":
            fail("indexer_types", "layer 0 must be 'full' (a shared layer reuses the previous layer's top-k)")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            fail("mlp_layer_types", f"must list 'dense' or 'sparse' for each of the {self.num_hidden_layers} layers")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                fail(name, f"must be in [0, vocab_size={self.vocab_size})")
        for tid in self.eos_token_ids:
            if not (isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < self.vocab_size):
                fail("eos_token_id", f"every id must be in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json dict (model_type glm_moe_dsa), unknown keys written back."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling"):
                continue
            out[f.name] = getattr(self, f.name)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_type": self.rope_type, "rope_theta": self.rope_theta}
        out["rope_parameters"] = rope  # transformers 5.x reads this
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["model_type"] = MODEL_TYPE
        out["architectures"] = ["GlmMoeDsaForCausalLM"]
        out["qk_head_dim"] = self.qk_head_dim
        out["head_dim"] = self.qk_rope_head_dim
        out["dtype"] = self.torch_dtype
        out["layer_types"] = ["indexed_attention"] * self.num_hidden_layers
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLM5Config:
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json model_type={model_type!r}: expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra = dict(data.pop("extra", {}) or {})
        # transformers 5.x: rope_parameters {"rope_type", "rope_theta", ...}; older: rope_theta + rope_scaling
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                theta = rope_params.pop("rope_theta")
                kwargs["rope_theta"] = float(theta) if isinstance(theta, int | float) else theta  # else: validate() names it
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                kwargs["rope_scaling"] = rope_params
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        else:
            data.pop("dtype", None)
        for derived in ("qk_head_dim", "head_dim", "layer_types", "architectures", "transformers_version"):
            if derived in data:
                extra.setdefault("_derived", {})[derived] = data.pop(derived)
        if data.get("rope_scaling") is None:
            data.pop("rope_scaling", None)
        if "index_topk_pattern" in data and data.get("indexer_types") is None:
            pattern = data.pop("index_topk_pattern")
            data["indexer_types"] = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        if "num_experts" in data:
            data["n_routed_experts"] = data.pop("num_experts")
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            else:
                extra[key] = value
        extra.pop("_derived", None)
        if isinstance(kwargs.get("torch_dtype"), str):
            kwargs["torch_dtype"] = kwargs["torch_dtype"].replace("torch.", "")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GLM5Config:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config.json must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GLM5Config:
        """Read `config.json` from a directory (or the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
        return path

    def replace(self, **changes: Any) -> GLM5Config:
        """A copy with fields changed (derived per-layer lists are re-derived unless given)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "num_hidden_layers" in changes or "index_topk_freq" in changes or "index_skip_topk_offset" in changes:
            data["indexer_types"] = None
        if "num_hidden_layers" in changes or "first_k_dense_replace" in changes:
            data["mlp_layer_types"] = None
        data.update(changes)
        return GLM5Config(**data)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> GLM5Config:
        """A small GLM-5 whose every width follows from `depth` (the number of decoder layers).

        hidden = 64·depth; heads = depth (one per 64 of hidden, min 2); the MLA, MoE and indexer widths keep
        GLM-5's proportions at a scale a CPU can train, except the KV latent (kv_lora_rank = hidden/2, see below).
        16 experts (8 below depth 8), 2 active, 1 shared, 1 dense layer, 1 MTP layer.
        """
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r}: must be a positive integer")
        hidden = 64 * depth
        heads = max(2, depth)
        n_experts = 8 if depth < 8 else 16
        cfg = dict(
            vocab_size=4096,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            moe_intermediate_size=hidden // 2,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            n_shared_experts=1,
            n_routed_experts=n_experts,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=hidden // 2,
            # the latent every key and value is made from: at hidden/4 (64 dims at depth 4) a token's identity
            # did not get through it and the demo model could not copy an argument out of a request (exact
            # tool calls 0.00); at hidden/2 the same training copies them (dev/LOG.md, copying experiments)
            kv_lora_rank=hidden // 2,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            index_topk=64,
            index_n_heads=8,
            # 64, not smaller: llama.cpp rotates the indexer's q and k by a Hadamard matrix of at least 64 rows,
            # so the model `make demo` trains can be exported to GGUF and run there (glm5 export gguf)
            index_head_dim=64,
            max_position_embeddings=4096,
            rope_theta=10_000.0,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
            torch_dtype="float32",
        )
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GLM5Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name](**overrides)


def indexer_pattern(num_layers: int, freq: int = 1, offset: int = 2) -> list[str]:
    """Which layers run their own indexer ("full") and which reuse the previous top-k ("shared").

    Same rule as transformers: layer i is full when max(i - offset + 1, 0) is a multiple of freq.
    freq=1 gives every layer an indexer (GLM-5); freq=4, offset=3 is GLM-5.2's IndexShare.
    """
    freq = max(int(freq), 1)
    return ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(num_layers)]


def _glm5_744b(**overrides: Any) -> GLM5Config:
    return GLM5Config(**overrides)


def _glm52_744b(**overrides: Any) -> GLM5Config:
    return GLM5Config(**{"index_topk_freq": 4, "index_skip_topk_offset": 3, **overrides})


def _tiny_bench(**overrides: Any) -> GLM5Config:
    """A tiny GLM-5-shaped config (vocab 4096, hidden 256, 4 layers, 16 experts top-4, index_topk 64): the size
    the benchmarks run glm5 and transformers at on a CPU."""
    cfg = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        kv_lora_rank=64,
        q_lora_rank=128,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        index_topk=64,
        index_n_heads=4,
        index_head_dim=64,
        max_position_embeddings=65536,
        rope_theta=10_000.0,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return GLM5Config(**cfg)


PRESETS = {
    "nano": lambda **o: GLM5Config.from_depth(4, **o),
    "micro": lambda **o: GLM5Config.from_depth(6, **o),
    "small": lambda **o: GLM5Config.from_depth(8, **o),
    "base": lambda **o: GLM5Config.from_depth(12, **o),
    "tiny-bench": _tiny_bench,
    "glm5-744b": _glm5_744b,
    "glm5.2-744b": _glm52_744b,
}
