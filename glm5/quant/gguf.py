"""GGUF export: a glm5 / Hugging Face `GlmMoeDsaForCausalLM` checkpoint as a file llama.cpp's `glm-dsa` runs.

    glm5 export gguf runs/latest/model model.gguf                  # f32, tokenizer embedded
    glm5 export gguf runs/latest/model model-q8.gguf --type q8_0   # f16 | bf16 | q8_0 | q4_k | q2_k

    from glm5.quant.gguf import export_gguf, read_gguf_state_dict
    export_gguf("runs/latest/model", "model.gguf", out_type="q8_0")
    state, cfg = read_gguf_state_dict("model.gguf")     # back to transformers' key names, dequantized

The layout is llama.cpp's `glm-dsa` architecture (llama.cpp `src/models/glm-dsa.cpp`, and the tensor and
key names of the `gguf` package): MLA stored for the absorbed form (`attn_kv_b` split into `attn_k_b`, per
head transposed, and `attn_v_b`), routed experts stacked into one 3-D tensor per projection, the router's
selection bias as `exp_probs_b`, the DSA indexer (`indexer.attn_q_b`, `indexer.attn_k`, `indexer.k_norm`,
`indexer.proj`) and its per-layer full / shared types, and the MTP layer kept as block `n_layers` with its
`nextn.*` tensors. The tokenizer goes in as a GPT-2 style byte-level BPE (tokens, merges, special ids,
the chat template).

The file is written tensor by tensor: a first pass over the checkpoint's headers fixes every tensor's name,
shape and type, a second pass converts and writes one tensor (one layer's experts) at a time, into a
temporary file beside the target that is renamed into place when complete.

Quantized types are llama.cpp's own block formats: q8_0 (blocks of 32, one fp16 scale), q4_k and q2_k
(super-blocks of 256 with 6- / 4-bit sub-block scales and mins). Norms, biases, the router and the
indexer's small projections stay f32, as llama.cpp's converter keeps them. `read_gguf_state_dict` reads
any such file back (dequantized), which is how the tests compare llama.cpp with glm5 on the exact weights
llama.cpp runs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm5.config import GLM5Config

ARCH = "glm-dsa"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k", "q2_k")
# llama.cpp's pre-tokenizer whose split is exactly ours (glm5.tokenizer.PRETOKENIZE_PATTERN) and that
# applies BPE merges to every word, as `tokenizers` does ("llama-bpe" / "glm4" would look whole words up
# first: ignore_merges, which can give other ids).
PRE_TOKENIZER = "dbrx"


class GGUFExportError(ValueError):
    """A checkpoint llama.cpp's `glm-dsa` cannot represent; the message names the field."""


# ----------------------------------------------------------------------------------------- what llama.cpp runs
def check_exportable(cfg: GLM5Config) -> None:
    """Refuse, naming the field, a config whose model llama.cpp's `glm-dsa` would compute differently."""

    def refuse(field: str, why: str) -> None:
        raise GGUFExportError(f"config.{field}: {why}; llama.cpp's glm-dsa cannot represent this model")

    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        refuse("n_group", f"group-limited routing (n_group={cfg.n_group}, topk_group={cfg.topk_group}) is not "
                          "read by glm-dsa, which routes over all experts")
    if cfg.topk_method != "noaux_tc":
        refuse("topk_method", f"{cfg.topk_method!r}: glm-dsa routes with sigmoid scores + selection bias (noaux_tc)")
    if cfg.hidden_act != "silu":
        refuse("hidden_act", f"{cfg.hidden_act!r}: glm-dsa's feed-forward is SwiGLU (silu)")
    if cfg.attention_bias:
        refuse("attention_bias", "glm-dsa has no attention biases")
    if getattr(cfg, "mlp_bias", False):
        refuse("mlp_bias", "glm-dsa has no MLP biases")
    if cfg.q_lora_rank is None:
        refuse("q_lora_rank", "None (a full-rank q projection): glm-dsa needs the low-rank q_a / q_b pair")
    if cfg.num_nextn_predict_layers > 1:
        refuse("num_nextn_predict_layers", f"{cfg.num_nextn_predict_layers}: glm-dsa loads at most one MTP layer")
    if cfg.qk_rope_head_dim > cfg.index_head_dim:
        refuse("index_head_dim", f"{cfg.index_head_dim} < qk_rope_head_dim {cfg.qk_rope_head_dim}: the indexer head "
                                 "holds the rotary part first")
    if not getattr(cfg, "indexer_rope_interleave", True):
        refuse("indexer_rope_interleave", "False: glm-dsa rotates the indexer's pairs interleaved")
    if cfg.rope_type not in ("default", "yarn"):
        refuse("rope_scaling", f"rope type {cfg.rope_type!r}: glm-dsa supports default and yarn")
    dense = cfg.mlp_layer_types.count("dense")
    if cfg.mlp_layer_types != ["dense"] * dense + ["sparse"] * (cfg.num_hidden_layers - dense):
        refuse("mlp_layer_types", "dense layers after a MoE layer: glm-dsa has dense layers only at the start")
    if cfg.index_head_dim < 64 or cfg.index_head_dim & (cfg.index_head_dim - 1):
        # llama.cpp multiplies the indexer's q and k by a Hadamard matrix (orthogonal: the scores are unchanged)
        # of the largest power of two >= 64 dividing the head size, so the two sizes must be equal; anything
        # else stops it with GGML_ASSERT(ggml_can_mul_mat(a, b)) (llama-kv-cache.cpp, build_input_k_rot)
        refuse("index_head_dim", f"{cfg.index_head_dim}: must be a power of two >= 64 (llama.cpp rotates the "
                                 "indexer's q and k by a Hadamard matrix of that size)")


# ----------------------------------------------------------------------------------------- tensor names
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# per-layer hub name -> GGUF name (block-relative), for every tensor copied as it is
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "self_attn.indexer.wk.weight": "indexer.attn_k.weight",
    "self_attn.indexer.k_norm.weight": "indexer.k_norm.weight",
    "self_attn.indexer.k_norm.bias": "indexer.k_norm.bias",
    "self_attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # the MTP layer's own parts
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
# 2-D weights llama.cpp's converter keeps in f32 whatever the file type (small, or read as f32 by its graph)
_KEEP_F32 = ("ffn_gate_inp.weight", "indexer.proj.weight", "indexer.attn_k.weight", "exp_probs_b.bias")


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]       # numpy (row-major) shape, as gguf-py takes it
    out_type: str                # f32 | f16 | bf16 | q8_0 | q4_k | q2_k
    make: Callable[[], np.ndarray]


def _tensor_type(name: str, shape: tuple[int, ...], out_type: str) -> str:
    if len(shape) == 1 or name.endswith(_KEEP_F32) or out_type == "f32":
        return "f32"
    if name == "token_embd.weight" and out_type in ("q4_k", "q2_k"):
        return "q8_0" if shape[-1] % 32 == 0 else "f16"  # the embedding is a lookup: keep it finer, like llama.cpp
    if out_type in ("q8_0",) and shape[-1] % 32:
        return "f16"
    if out_type in ("q4_k", "q2_k") and shape[-1] % 256:
        return "q8_0" if shape[-1] % 32 == 0 else "f16"  # rows that are not whole super-blocks
    return out_type


def _plan(directory: str, cfg: GLM5Config, out_type: str) -> list[_Planned]:
    """Every output tensor with its shape and type, read from the safetensors headers (no tensor loaded)."""
    from safetensors import safe_open

    from glm5.checkpoint import CheckpointError, checkpoint_files

    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    where[key] = (path, tuple(f.get_slice(key).get_shape()))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    if any(k.endswith("weight_scale_inv") for k in where):
        raise GGUFExportError(f"{directory} is an FP8 checkpoint: export the bf16/fp32 original instead "
                              "(quantize for llama.cpp with --type q8_0 / q4_k / q2_k)")

    def loader(key: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            import torch
            from safetensors import safe_open

            with safe_open(where[key][0], framework="pt", device="cpu") as f:
                return f.get_tensor(key).to(torch.float32).numpy()
        return load

    planned: list[_Planned] = []

    def add(name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray]) -> None:
        planned.append(_Planned(name, shape, _tensor_type(name, shape, out_type), make))

    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in where]
    if missing:
        raise GGUFExportError(f"{directory}: checkpoint lacks {missing[0]}")
    for key, gguf_name in _GLOBAL_NAMES.items():
        if key in where:
            add(gguf_name, where[key][1], loader(key))
    n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    h_kv, nope, v_dim, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for layer in range(n_blocks):
        prefix = f"model.layers.{layer}."
        keys = sorted(k[len(prefix):] for k in where if k.startswith(prefix))
        if not keys:
            raise GGUFExportError(f"{directory}: checkpoint has no tensors for layer {layer} "
                                  f"(config: {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP)")
        experts: dict[str, list[str]] = {}
        for rel in keys:
            key = prefix + rel
            if (m := _EXPERT.match(rel)) is not None:
                experts.setdefault(m.group(2), []).append(key)
                continue
            if rel == "self_attn.kv_b_proj.weight":
                out, inp = where[key][1]
                if out != h_kv * (nope + v_dim) or inp != rank:
                    raise GGUFExportError(f"{key}: shape {(out, inp)}, expected {(h_kv * (nope + v_dim), rank)}")

                def kv_b(key=key) -> np.ndarray:
                    return loader(key)().reshape(h_kv, nope + v_dim, rank)
                # absorbed MLA: k_b [heads, rank, nope] (each head's W_UK transposed), v_b [heads, v, rank]
                add(f"blk.{layer}.attn_k_b.weight", (h_kv, rank, nope),
                    lambda f=kv_b: np.ascontiguousarray(f()[:, :nope, :].transpose(0, 2, 1)))
                add(f"blk.{layer}.attn_v_b.weight", (h_kv, v_dim, rank),
                    lambda f=kv_b: np.ascontiguousarray(f()[:, nope:, :]))
                continue
            if rel not in _LAYER_NAMES:
                raise GGUFExportError(f"{key}: no place for this tensor in llama.cpp's glm-dsa layout")
            add(f"blk.{layer}.{_LAYER_NAMES[rel]}", where[key][1], loader(key))
        for proj, names in experts.items():
            names.sort(key=lambda k: int(_EXPERT.match(k[len(prefix):]).group(1)))
            if len(names) != cfg.n_routed_experts:
                raise GGUFExportError(f"layer {layer}: {len(names)} {proj} experts, config says {cfg.n_routed_experts}")

            def stacked(names=tuple(names)) -> np.ndarray:
                return np.stack([loader(k)() for k in names])
            add(f"blk.{layer}.{_EXPERT_NAMES[proj]}", (len(names), *where[names[0]][1]), stacked)
    return planned


# ----------------------------------------------------------------------------------------- quantization
def _quantize(data: np.ndarray, out_type: str) -> tuple[np.ndarray, object]:
    """(array to write: the raw values or the blocks' bytes, its GGMLQuantizationType)."""
    import gguf

    from glm5.quant.kquants import quantize_q2_k, quantize_q4_k

    data = np.ascontiguousarray(data, dtype=np.float32)
    qtype = _qtype(out_type)
    if out_type == "f32":
        return data, qtype
    if out_type == "f16":
        return data.astype(np.float16), qtype
    if out_type in ("bf16", "q8_0"):
        return gguf.quants.quantize(data, qtype), qtype
    return {"q4_k": quantize_q4_k, "q2_k": quantize_q2_k}[out_type](data), qtype


# ----------------------------------------------------------------------------------------- tokenizer
def _tokenizer_fields(tokenizer_dir: Path, vocab_size: int) -> dict:
    """tokens, token types, merges and special ids from a byte-level BPE `tokenizer.json`."""
    import gguf

    from glm5.tokenizer import EOS_TOKENS, PAD_TOKEN, Tokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{tokenizer_dir}: no tokenizer.json to embed (pass --tokenizer DIR)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFExportError(f"{path}: only byte-level BPE tokenizers can be embedded (model.type={model.get('type')!r})")
    tok = Tokenizer.from_file(path)
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id >= vocab_size:
            raise GGUFExportError(f"{path}: token id {token_id} does not fit the model's vocab_size {vocab_size}")
        tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        token_id = added["id"]
        if token_id >= vocab_size:
            raise GGUFExportError(f"{path}: token id {token_id} does not fit the model's vocab_size {vocab_size}")
        tokens[token_id] = added["content"]
        types[token_id] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"  # ids the model has but the tokenizer never produces
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    eos = [tok.special_token_id(name) for name in EOS_TOKENS if name in tok.special_tokens]
    return {"tokens": tokens, "types": types, "merges": merges, "eos": eos,
            "pad": tok.special_tokens.get(PAD_TOKEN), "chat_template": tok.chat_template}


# ----------------------------------------------------------------------------------------- export
def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, out_type: str = "f32",
                tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """Write `out_path` (GGUF, llama.cpp `glm-dsa`) from a checkpoint directory; returns the path."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"--type {out_type!r}: choose from {', '.join(OUT_TYPES)}")
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists (pass --overwrite to replace it)")
    if out_path.is_dir():
        raise IsADirectoryError(f"{out_path} is a directory; give a file name such as model.gguf")
    cfg = GLM5Config.from_pretrained(model_dir)
    check_exportable(cfg)
    vocab = _tokenizer_fields(Path(tokenizer_dir) if tokenizer_dir else model_dir, cfg.vocab_size)
    planned = _plan(os.fspath(model_dir), cfg, out_type)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".glm5-gguf-", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _write_metadata(writer, cfg, vocab, out_type, name=model_dir.resolve().name)
        # pass 1: every tensor's header, from the planned shapes and the byte size of its quantized form
        sizes = {}
        for t in planned:
            qtype = _qtype(t.out_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(t.shape)) // block * type_size
            sizes[t.name] = nbytes
            writer.add_tensor_info(t.name, _raw_shape(t.shape, qtype), _numpy_dtype(qtype), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # pass 2: one tensor at a time
        for i, t in enumerate(planned, 1):
            data, qtype = _quantize(t.make(), t.out_type)
            if data.nbytes != sizes[t.name]:
                raise AssertionError(f"{t.name}: {data.nbytes} bytes written, {sizes[t.name]} announced")
            writer.write_tensor_data(data)
            if log and (i == len(planned) or i % 50 == 0):
                log(f"  {i}/{len(planned)} tensors")
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if log:
        counts: dict[str, int] = {}
        for t in planned:
            counts[t.out_type] = counts.get(t.out_type, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        log(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {len(planned)} tensors: {kinds}; "
            f"arch {ARCH}, {len(vocab['tokens'])} tokens)")
    return out_path


def _qtype(out_type: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, out_type.upper())


def _raw_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    # gguf-py takes the shape of a tensor stored as bytes (bf16 and the block formats) in bytes along the last axis
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


def _numpy_dtype(qtype):
    import gguf

    q = gguf.GGMLQuantizationType
    return {q.F32: np.float32, q.F16: np.float16}.get(qtype, np.uint8)


def _write_metadata(writer, cfg: GLM5Config, vocab: dict, out_type: str, name: str) -> None:
    import gguf

    n_layers = cfg.num_hidden_layers
    w = writer
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K}[out_type])
    w.add_block_count(n_layers + cfg.num_nextn_predict_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.mlp_layer_types.count("dense"))  # check_exportable: all leading
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_type == "yarn":
        rs = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings)))
        if rs.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
    if cfg.num_nextn_predict_layers:
        w.add_uint32(f"{ARCH}.nextn_predict_layers", cfg.num_nextn_predict_layers)
    w.add_uint32(f"{ARCH}.attention.indexer.head_count", cfg.index_n_heads)
    w.add_uint32(f"{ARCH}.attention.indexer.key_length", cfg.index_head_dim)
    w.add_uint32(f"{ARCH}.attention.indexer.top_k", cfg.index_topk)
    # per layer: full indexer (True) or IndexShare's reuse of the previous top-k (False); written always, since
    # llama.cpp otherwise infers it from the context length
    w.add_array(f"{ARCH}.attention.indexer.types", [t == "full" for t in cfg.indexer_types])
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    if vocab["eos"]:
        w.add_eos_token_id(vocab["eos"][0])
        w.add_eot_token_id(vocab["eos"][0])
    if vocab["pad"] is not None:
        w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(False)
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])


# ----------------------------------------------------------------------------------------- reading back
def read_gguf_state_dict(path: str | os.PathLike) -> tuple[dict, dict]:
    """A `glm-dsa` GGUF's tensors in transformers' key names (dequantized to fp32) and its metadata.

    The inverse of `export_gguf`'s layout: experts unstacked, `attn_k_b` / `attn_v_b` joined back into
    `kv_b_proj`. Used to check that llama.cpp and glm5 compute the same thing on the same weights.
    """
    import gguf
    import torch

    reader = gguf.GGUFReader(os.fspath(path))
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path}: architecture {arch!r}, expected {ARCH!r}")
    meta = {f.name: _field(reader, f.name) for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}
    reverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    reverse_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    reverse_expert = {v: k for k, v in _EXPERT_NAMES.items()}
    state: dict[str, torch.Tensor] = {}
    k_b: dict[int, np.ndarray] = {}
    v_b: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.name in reverse_global:
            state[reverse_global[t.name]] = torch.from_numpy(data.copy())
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
        layer, rel = int(m.group(1)), m.group(2)
        if rel == "attn_k_b.weight":
            k_b[layer] = data
        elif rel == "attn_v_b.weight":
            v_b[layer] = data
        elif rel in reverse_expert:
            for e in range(data.shape[0]):
                state[f"model.layers.{layer}.mlp.experts.{e}.{reverse_expert[rel]}.weight"] = torch.from_numpy(data[e].copy())
        elif rel in reverse_layer:
            state[f"model.layers.{layer}.{reverse_layer[rel]}"] = torch.from_numpy(data.copy())
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
    for layer, kb in k_b.items():
        joined = np.concatenate([kb.transpose(0, 2, 1), v_b[layer]], axis=1)  # [heads, nope + v, rank]
        state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = torch.from_numpy(
            np.ascontiguousarray(joined.reshape(-1, joined.shape[-1])))
    return state, meta


def load_gguf_model(path: str | os.PathLike, config_dir: str | os.PathLike):
    """A GLM5ForCausalLM with the (dequantized) weights of a `glm-dsa` GGUF; its config from `config_dir`."""
    from glm5.checkpoint import load_hub_tensors
    from glm5.model.transformer import GLM5ForCausalLM

    state, _ = read_gguf_state_dict(path)
    model = GLM5ForCausalLM(GLM5Config.from_pretrained(config_dir))
    load_hub_tensors(model, state.items(), path)
    return model.eval()


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # older gguf-py
        return field.parts[field.data[0]].tolist() if field.data else None


def iter_gguf_tensor_names(path: str | os.PathLike) -> Iterator[str]:
    import gguf

    for t in gguf.GGUFReader(os.fspath(path)).tensors:
        yield t.name
