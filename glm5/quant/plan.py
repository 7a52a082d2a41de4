"""The deployment planner: how much memory GLM-5 takes in a given format, how many GPUs it needs, how much
KV cache fits, and how fast decoding can at most go.

    glm5 plan --preset glm5-744b --weights fp8 --gpu h200                 # a table
    glm5 plan --preset glm5-744b --weights bf16 --gpu h100 --json         # one JSON object
    glm5 plan --config config.json --weights q2 --avg-bits 2.56 --gpu cpu
    glm5 plan --preset glm5-744b --weights int4 --gpu h100 --gpus 1 --gpu-experts 16   # KTransformers-style offload

Weights are counted from the model itself, built on the meta device (no memory), and split into the groups
a format treats differently: routed experts; other quantizable matrices (attention, dense MLP, shared
expert, indexer wq_b / wk); and what every format keeps in BF16 (embeddings, lm_head, norms, router,
indexer weights_proj, MTP eh_proj: `glm5.quant.fp8.MODULES_TO_NOT_CONVERT`). Formats:
- bf16: 2 bytes everywhere.
- fp8: quantizable matrices 1 byte + one fp32 scale per 128×128 block (the GLM-5-FP8 layout), the rest BF16.
- int4: quantizable matrices 4 bits + one BF16 scale per 128 inputs (GPTQ/AWQ-style, symmetric), the rest BF16.
- q2: a GGUF-style low-bit mix, modelled by its average bits per parameter over all weights (default 2.56,
  the published 241 GB build); real mixes give attention more bits and experts fewer.

Memory model (SGLang's `mem_fraction_static`): each GPU gives `mem_fraction` (0.85) of its memory to weights +
KV cache; the rest is activations, CUDA graphs and the runtime. Weights are spread evenly (tensor parallel
attention / dense parts, expert parallel experts). MLA keeps one latent per token shared by all heads, so
under tensor-parallel attention every GPU holds the whole KV cache of every sequence; with data-parallel
attention (`--attention dp`, default, as SGLang's `--enable-dp-attention`) each GPU holds its own sequences'.

Decode bound: one decode step of `concurrency` sequences reads every non-routed weight once, each routed
expert some token picked (expected count with uniform routing) and each sequence's KV cache (the indexer
keys of all past tokens, the latent of the top-k chosen ones). The step takes at least the busiest GPU's
bytes over its bandwidth (experts are whole: a layer's expert read is at least one expert) and at least
FLOPs over the aggregate peak; tokens/s <= concurrency / that time. Real systems reach a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field

WEIGHT_FORMATS = ("bf16", "fp8", "int4", "q2")
KV_DTYPES = ("bf16", "fp8")
ATTENTION_PARALLEL = ("dp", "tp")
DEFAULT_Q2_AVG_BITS = 2.56
DEFAULT_MEM_FRACTION = 0.85
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPUS_FILE = os.path.join(os.path.dirname(__file__), "gpus.json")
BLOCK = 128


def load_gpu_specs(path: str = GPUS_FILE) -> dict[str, dict]:
    with open(path, encoding="utf-8") as fh:
        return {k: v for k, v in json.load(fh).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------- weights
@dataclass
class WeightGroups:
    """Parameter counts by how a format treats them (one of these for the main model, one for MTP)."""

    routed: int = 0  # routed experts (all of them)
    quantizable: int = 0  # other matrices a weight-only format quantizes
    kept: int = 0  # stays BF16 in every format (embeddings, lm_head, norms, router, weights_proj, eh_proj)
    embedding: int = 0  # part of `kept`: the input embedding (a lookup: decode reads a row, not the table)
    routed_blocks: int = 0  # 128×128 FP8 scale blocks of the routed experts (gate, up, down separately)
    other_blocks: int = 0  # ... of the other quantizable matrices
    routed_groups: int = 0  # int4 groups (128 inputs of one output row) of the routed experts
    other_groups: int = 0  # ... of the other quantizable matrices

    @property
    def total(self) -> int:
        return self.routed + self.quantizable + self.kept

    def routed_bytes(self, weights: str, avg_bits: float = DEFAULT_Q2_AVG_BITS) -> int:
        return _format_bytes(weights, self.routed, self.routed_blocks, self.routed_groups, avg_bits)

    def bytes(self, weights: str, avg_bits: float = DEFAULT_Q2_AVG_BITS) -> int:
        other = _format_bytes(weights, self.quantizable, self.other_blocks, self.other_groups, avg_bits)
        kept = round(self.kept * avg_bits / 8) if weights == "q2" else 2 * self.kept
        return self.routed_bytes(weights, avg_bits) + other + kept


def _format_bytes(weights: str, params: int, fp8_blocks: int, int4_groups: int, avg_bits: float) -> int:
    """Bytes of quantizable matrices holding `params` weights in a format."""
    if weights == "bf16":
        return 2 * params
    if weights == "fp8":
        return params + 4 * fp8_blocks  # e4m3 + one fp32 weight_scale_inv per 128×128 block
    if weights == "int4":
        return params // 2 + 2 * int4_groups  # 4 bits + one bf16 scale per 128 inputs
    if weights == "q2":
        return round(params * avg_bits / 8)
    raise ValueError(f"--weights {weights!r}: expected one of {WEIGHT_FORMATS}")


def weight_groups(cfg) -> tuple[WeightGroups, WeightGroups]:
    """(main model, MTP module) parameter groups of the tensors a checkpoint holds (glm5.params.checkpoint_tensors,
    the count `glm5 params` gives)."""
    from glm5.params import checkpoint_tensors
    from glm5.quant.fp8 import should_quantize

    main, mtp = WeightGroups(), WeightGroups()
    for name, shape in checkpoint_tensors(cfg).items():
        group = mtp if name.startswith("mtp.") else main
        n = math.prod(shape)
        if len(shape) == 3 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, rows, cols = shape
            group.routed += n
            matrices = (2, rows // 2) if name.endswith("gate_up_proj") else (1, rows)  # gate and up apart on disk
            group.routed_blocks += experts * matrices[0] * math.ceil(matrices[1] / BLOCK) * math.ceil(cols / BLOCK)
            group.routed_groups += experts * rows * math.ceil(cols / BLOCK)
        elif len(shape) == 2 and name.endswith(".weight") and should_quantize(name.removesuffix(".weight")):
            rows, cols = shape
            group.quantizable += n
            group.other_blocks += math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK)
            group.other_groups += rows * math.ceil(cols / BLOCK)
        else:
            group.kept += n
            if name == "model.embed_tokens.weight":
                group.embedding += n
    return main, mtp


# ---------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(cfg, kv_dtype: str = "bf16", include_mtp: bool = False) -> int:
    """Bytes of KV cache one token takes over all layers: the MLA latent + shared RoPE key, plus the DSA
    indexer key on layers that run an indexer (IndexShare layers reuse the previous top-k and store none).

    bf16: (kv_lora_rank + qk_rope_head_dim) × 2 + index_head_dim × 2.
    fp8 (vLLM's layout): latent in fp8 with one fp32 scale per 128 + RoPE key in bf16; indexer key in fp8 + one
    fp32 scale per 128. For GLM-5: 656 + 132 bytes per layer.
    """
    if kv_dtype == "bf16":
        latent = 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        index_key = 2 * cfg.index_head_dim
    elif kv_dtype == "fp8":
        latent = cfg.kv_lora_rank + 4 * math.ceil(cfg.kv_lora_rank / BLOCK) + 2 * cfg.qk_rope_head_dim
        index_key = cfg.index_head_dim + 4 * math.ceil(cfg.index_head_dim / BLOCK)
    else:
        raise ValueError(f"--kv-dtype {kv_dtype!r}: expected one of {KV_DTYPES}")
    indexed_layers = sum(cfg.has_indexer(i) for i in range(cfg.num_hidden_layers))
    layers = cfg.num_hidden_layers
    if include_mtp:  # each MTP layer is a full decoder layer with its own indexer
        layers += cfg.num_nextn_predict_layers
        indexed_layers += cfg.num_nextn_predict_layers
    return layers * latent + indexed_layers * index_key


def kv_bytes_per_token_expanded(cfg) -> int:
    """What a naive cache of per-head K and V (BF16) would take: the figure MLA exists to avoid."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
    return cfg.num_hidden_layers * per_layer


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class PlanRequest:
    weights: str = "fp8"
    gpu: str = "h200"
    gpus: int | None = None  # None: the fewest that fit
    context: int | None = None  # tokens per sequence; None: the model's max_position_embeddings
    concurrency: int = 1
    kv_dtype: str = "bf16"
    avg_bits: float = DEFAULT_Q2_AVG_BITS
    gpu_experts: int | None = None  # KTransformers offload: routed experts per layer kept on GPU; rest in CPU RAM
    mtp: bool = False  # load the MTP module too (speculative decoding)
    mem_fraction: float = DEFAULT_MEM_FRACTION
    attention: str = "dp"


@dataclass
class Plan:
    request: dict
    gpu: dict
    params: dict
    weights_bytes: int  # on the GPUs (or CPUs for --gpu cpu)
    checkpoint_bytes: int  # the whole checkpoint in this format, MTP included (what a download / disk holds)
    cpu_offload_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_expanded: int
    kv_bytes_total: int  # context × concurrency
    gpus: int
    gpus_needed: int | None
    fits: bool
    max_kv_tokens: int
    layout: dict
    decode: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _validate(req: PlanRequest, specs: dict) -> None:
    if req.weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights {req.weights!r}: expected one of {WEIGHT_FORMATS}")
    if req.kv_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-dtype {req.kv_dtype!r}: expected one of {KV_DTYPES}")
    if req.gpu not in specs:
        raise ValueError(f"--gpu {req.gpu!r}: expected one of {tuple(specs)} (see {GPUS_FILE})")
    if req.attention not in ATTENTION_PARALLEL:
        raise ValueError(f"--attention {req.attention!r}: expected one of {ATTENTION_PARALLEL}")
    if req.gpus is not None and req.gpus < 1:
        raise ValueError(f"--gpus {req.gpus}: must be >= 1")
    if req.context is not None and req.context < 1:
        raise ValueError(f"--context {req.context}: must be >= 1")
    if req.concurrency < 1:
        raise ValueError(f"--concurrency {req.concurrency}: must be >= 1")
    if not 0 < req.avg_bits <= 16:
        raise ValueError(f"--avg-bits {req.avg_bits}: must be in (0, 16]")
    if req.avg_bits != DEFAULT_Q2_AVG_BITS and req.weights != "q2":
        raise ValueError("--avg-bits applies to --weights q2 only")
    if not 0 < req.mem_fraction <= 1:
        raise ValueError(f"--mem-fraction {req.mem_fraction}: must be in (0, 1]")


def plan(cfg, req: PlanRequest, specs: dict | None = None) -> Plan:
    specs = specs or load_gpu_specs()
    _validate(req, specs)
    gpu = specs[req.gpu]
    context = req.context or cfg.max_position_embeddings
    experts = cfg.n_routed_experts
    if req.gpu_experts is not None and not 0 <= req.gpu_experts <= experts:
        raise ValueError(f"--gpu-experts {req.gpu_experts}: must be in [0, n_routed_experts={experts}]")
    if req.gpu_experts is not None and req.gpu == "cpu":
        raise ValueError("--gpu-experts offloads experts from GPUs to CPU RAM: pick a GPU with --gpu")

    main, mtp = weight_groups(cfg)
    loaded = [main, mtp] if req.mtp else [main]
    fmt = req.weights
    routed_bytes = sum(g.routed_bytes(fmt, req.avg_bits) for g in loaded)
    all_bytes = sum(g.bytes(fmt, req.avg_bits) for g in loaded)
    offloaded_fraction = 0.0 if req.gpu_experts is None else 1 - req.gpu_experts / experts
    cpu_offload_bytes = round(routed_bytes * offloaded_fraction)
    weights_bytes = all_bytes - cpu_offload_bytes
    checkpoint_bytes = main.bytes(fmt, req.avg_bits) + mtp.bytes(fmt, req.avg_bits)

    kv_per_token = kv_bytes_per_token(cfg, req.kv_dtype, include_mtp=req.mtp)
    kv_total = kv_per_token * context * req.concurrency
    usable_per_gpu = gpu["memory_gb"] * 1e9 * req.mem_fraction

    def free_kv_bytes(n: int) -> float:
        free_total = n * usable_per_gpu - weights_bytes
        # TP attention replicates the latent cache on every GPU of the group; DP attention splits sequences
        return free_total if req.attention == "dp" else free_total / n

    def fits_on(n: int) -> bool:
        return free_kv_bytes(n) >= kv_total and weights_bytes / n <= usable_per_gpu

    gpus_needed = next((n for n in GPU_COUNTS if fits_on(n)), None)
    n = req.gpus or gpus_needed or GPU_COUNTS[-1]
    fits = fits_on(n)
    max_kv_tokens = max(0, math.floor(free_kv_bytes(n) / kv_per_token))

    per_node = gpu.get("gpus_per_node", 8)
    heads = cfg.num_attention_heads
    layout = {
        "gpus": n,
        "nodes": math.ceil(n / per_node),
        "tensor_parallel": n,
        "expert_parallel": n,
        "attention": "data-parallel (each GPU its own sequences)" if req.attention == "dp" else "tensor-parallel",
        "attention_heads_per_gpu": heads / n,
        "routed_experts_per_gpu": (experts if req.gpu_experts is None else req.gpu_experts) / n,
        "weights_bytes_per_gpu": weights_bytes / n,
        "cpu_offload_bytes": cpu_offload_bytes,
    }
    notes = []
    if heads % n and n <= heads:
        notes.append(f"{heads} attention heads do not split evenly over {n} GPUs")
    if n > heads:
        notes.append(f"more GPUs ({n}) than attention heads ({heads}): attention must run data-parallel")
    if fmt == "fp8" and gpu.get("fp8_tflops") is None:
        notes.append(f"{gpu['name']} has no FP8 tensor cores: FP8 weights are dequantized to BF16 for each matmul")
    if req.gpu == "cpu":
        notes.append("--gpu cpu: 'gpus' counts CPU servers; memory and bandwidth are the server's DRAM")

    decode = _decode_bound(cfg, req, gpu, specs["cpu"], n, context, main, mtp, routed_bytes, all_bytes, offloaded_fraction)
    params = {"total_params": main.total, "mtp_params": mtp.total, "routed_expert_params": main.routed,
              "quantizable_params": main.quantizable, "kept_params": main.kept}
    return Plan(
        request={**asdict(req), "context": context}, gpu=gpu, params=params, weights_bytes=weights_bytes,
        checkpoint_bytes=checkpoint_bytes, cpu_offload_bytes=cpu_offload_bytes, kv_bytes_per_token=kv_per_token,
        kv_bytes_per_token_expanded=kv_bytes_per_token_expanded(cfg), kv_bytes_total=kv_total, gpus=n,
        gpus_needed=gpus_needed, fits=fits, max_kv_tokens=max_kv_tokens, layout=layout, decode=decode, notes=notes,
    )


def _decode_bound(cfg, req, gpu, cpu, n, context, main, mtp, routed_bytes, all_bytes, offloaded_fraction) -> dict:
    """Upper bound on decode tokens/s for `concurrency` sequences at `context` tokens each.

    One step's time is at least the busiest GPU's reads over its bandwidth: its share of the non-routed
    weights (split n ways), its routed experts (whole experts: at least one per MoE layer, else the expected
    distinct experts touched / n) and the KV cache of its sequences; offloaded experts are read from CPU RAM
    in series. It is also at least FLOPs / aggregate peak. The bound is the larger of the two.
    """
    batch, experts, top_k = req.concurrency, cfg.n_routed_experts, cfg.num_experts_per_tok
    # expected distinct experts one layer's batch touches, uniform routing: E·(1 − (1 − k/E)^B)
    touched = experts * (1 - (1 - top_k / experts) ** batch)
    loaded = [main, mtp] if req.mtp else [main]
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + (cfg.num_nextn_predict_layers if req.mtp else 0)
    expert_bytes = routed_bytes / max(moe_layers * experts, 1)
    embedding_bytes = sum(g.embedding for g in loaded) * 2
    dense_bytes = all_bytes - routed_bytes - embedding_bytes  # every step reads all of it once
    on_gpu = 1 - offloaded_fraction
    busiest_gpu_experts = max(touched * on_gpu / n, min(1.0, touched * on_gpu))  # per MoE layer
    cpu_experts = touched * offloaded_fraction
    # KV read per sequence per step: indexer keys of every past token, latent + rope of the top-k selected ones
    layers = cfg.num_hidden_layers
    indexed = sum(cfg.has_indexer(i) for i in range(layers))
    kv_elem = 2 if req.kv_dtype == "bf16" else 1
    selected = min(context, cfg.index_topk)
    kv_per_seq = (indexed * context * cfg.index_head_dim + layers * selected * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)) * kv_elem
    # dp attention: a GPU reads its own sequences (at least one); tp: every GPU reads every sequence's latent
    busiest_kv = max(batch * kv_per_seq / n, kv_per_seq) if req.attention == "dp" else batch * kv_per_seq
    gpu_bytes = dense_bytes / n + moe_layers * busiest_gpu_experts * expert_bytes + busiest_kv
    cpu_bytes = moe_layers * cpu_experts * expert_bytes
    t_memory = gpu_bytes / (gpu["bandwidth_gb_s"] * 1e9) + cpu_bytes / (cpu["bandwidth_gb_s"] * 1e9)
    # FLOPs per token: 2 per active weight, plus absorbed MLA over the selected latents and the indexer scan
    active = main.total - main.embedding - main.routed * (1 - top_k / experts)
    attn_flops = layers * cfg.num_attention_heads * 2 * selected * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    index_flops = indexed * cfg.index_n_heads * 2 * context * cfg.index_head_dim
    flops = batch * (2 * active + attn_flops + index_flops)
    peak_tflops = gpu["fp8_tflops"] if req.weights == "fp8" and gpu.get("fp8_tflops") else gpu["bf16_tflops"]
    t_compute = flops / (n * peak_tflops * 1e12)
    step = max(t_memory, t_compute)
    return {
        "tokens_per_s_upper_bound": batch / step,
        "per_sequence_tokens_per_s_upper_bound": 1 / step,
        "bound_by": "memory bandwidth" if t_memory >= t_compute else "compute",
        "busiest_gpu_bytes_per_step": gpu_bytes,
        "cpu_bytes_per_step": cpu_bytes,
        "kv_bytes_read_per_sequence": kv_per_seq,
        "experts_touched_per_layer": touched,
        "active_params_per_token": active,
        "step_time_memory_s": t_memory,
        "step_time_compute_s": t_compute,
    }


# ---------------------------------------------------------------------------------------------- output
def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def format_table(p: Plan) -> str:
    r = p.request
    fmt = r["weights"] + (f" ({r['avg_bits']} bits/param avg)" if r["weights"] == "q2" else "")
    rows = [
        ("model", f"{p.params['total_params'] / 1e9:,.1f}B params (+{p.params['mtp_params'] / 1e9:,.2f}B MTP)"),
        ("weights format", fmt + (" + MTP" if r["mtp"] else "")),
        ("weights on device", _gb(p.weights_bytes)),
        ("checkpoint (incl. MTP)", _gb(p.checkpoint_bytes)),
    ]
    if p.cpu_offload_bytes:
        rows.append(("routed experts in CPU RAM", f"{_gb(p.cpu_offload_bytes)} ({r['gpu_experts']} hot experts/layer on GPU)"))
    rows += [
        ("KV cache per token", f"{p.kv_bytes_per_token:,} B ({r['kv_dtype']}; naive per-head K/V would be {p.kv_bytes_per_token_expanded:,} B)"),
        ("KV cache needed", f"{_gb(p.kv_bytes_total)} ({r['context']:,} tokens × {r['concurrency']} sequences)"),
        ("device", f"{p.gpus} × {p.gpu['name']} ({p.gpu['memory_gb']} GB, {r['mem_fraction']:.0%} usable)"),
        ("fewest GPUs that fit", str(p.gpus_needed) if p.gpus_needed else f"none up to {GPU_COUNTS[-1]}"),
        ("fits", "yes" if p.fits else "NO"),
        ("max KV tokens", f"{p.max_kv_tokens:,}"),
        ("layout", f"TP {p.layout['tensor_parallel']} / EP {p.layout['expert_parallel']}, {p.layout['nodes']} node(s), "
                   f"{p.layout['routed_experts_per_gpu']:g} experts/GPU/layer, attention {r['attention']}"),
        ("decode upper bound", f"{p.decode['tokens_per_s_upper_bound']:,.0f} tok/s total, "
                               f"{p.decode['per_sequence_tokens_per_s_upper_bound']:,.1f} tok/s per sequence "
                               f"({p.decode['bound_by']})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="deployment planner: memory, GPUs, KV cache, decode speed bound",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a named config (default glm5-744b); see glm5.config.PRESETS")
    src.add_argument("--config", default=None, help="a config.json (file or directory) instead of a preset")
    p.add_argument("--weights", default="fp8", choices=WEIGHT_FORMATS, help="weight format (default fp8)")
    p.add_argument("--avg-bits", type=float, default=DEFAULT_Q2_AVG_BITS,
                   help=f"q2 only: average bits per parameter (default {DEFAULT_Q2_AVG_BITS}, the published 241 GB build)")
    p.add_argument("--gpu", default="h200", help="device kind from gpus.json: h100, h200, b200, a100, mi300x, cpu (default h200)")
    p.add_argument("--gpus", type=int, default=None, help="number of devices (default: the fewest that fit)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: max_position_embeddings)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES, help="KV cache format (default bf16)")
    p.add_argument("--gpu-experts", type=int, default=None,
                   help="KTransformers-style offload: routed experts per layer kept on GPU, the rest in CPU RAM")
    p.add_argument("--mtp", action="store_true", help="also load the MTP module (speculative decoding)")
    p.add_argument("--mem-fraction", type=float, default=DEFAULT_MEM_FRACTION,
                   help=f"share of each device's memory for weights + KV cache (default {DEFAULT_MEM_FRACTION})")
    p.add_argument("--attention", default="dp", choices=ATTENTION_PARALLEL,
                   help="dp: each GPU caches its own sequences (default); tp: the latent cache is replicated per GPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def config_from_args(args):
    from glm5.config import GLM5Config

    if args.config:
        return GLM5Config.from_pretrained(args.config)
    return GLM5Config.from_preset(args.preset or "glm5-744b")


def run(args) -> int:
    cfg = config_from_args(args)
    req = PlanRequest(weights=args.weights, gpu=args.gpu, gpus=args.gpus, context=args.context,
                      concurrency=args.concurrency, kv_dtype=args.kv_dtype, avg_bits=args.avg_bits,
                      gpu_experts=args.gpu_experts, mtp=args.mtp, mem_fraction=args.mem_fraction,
                      attention=args.attention)
    result = plan(cfg, req)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0
