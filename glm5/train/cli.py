"""`glm5 train STAGE`: one training stage from local data, resumable, on one process or under torchrun.

    glm5 train pretrain --data corpus.jsonl --preset nano --out runs/pt --steps 500
    glm5 train dsa-warmup --init runs/pt/model --data corpus.jsonl --out runs/warm --steps 100
    glm5 train dsa-sparse --init runs/warm/model --data corpus.jsonl --out runs/sparse --steps 200
    glm5 train sft --init runs/sparse/model --data chats.jsonl --out runs/sft --steps 200
    glm5 train pretrain ... --resume                      # continue exactly from the last checkpoint
    torchrun --nproc_per_node 2 -m glm5.cli train pretrain --parallel ddp ...     # or --parallel fsdp

Data: .txt, .jsonl ({"text": ...} for pretraining, {"messages": [...], "tools": [...]} for SFT), .parquet,
or a `datasets.save_to_disk` folder; several paths may be given. SFT leaves out a conversation longer than
--seq-len (--truncate cuts it instead); the log line and OUT/data.json say how many. The model comes from --init (a model
directory, e.g. a previous stage's OUT/model), --config (a config.json) or --preset. The result is written
to OUT/model (config.json + safetensors + tokenizer), which the next stage, the engine and the server load.
Every input is checked before any work starts, and nothing in OUT is overwritten without --resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path


def _check_inputs(args) -> None:
    """Clear errors for bad input, before anything is written."""
    from glm5.train.checkpoints import latest_checkpoint, load_checkpoint

    for path in args.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"no such data file or folder: {path}")
    if args.ternary and args.parallel == "fsdp":
        raise ValueError("--ternary runs without FSDP (its parametrized weights are not sharded); use ddp or none")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    ckpt_dir = Path(args.out) / "checkpoints" / args.stage
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        if not args.resume:
            raise ValueError(f"{args.out} already holds a {args.stage} run; pass --resume to continue it "
                             "or choose another --out (nothing was overwritten)")
        load_checkpoint(latest)  # a corrupt file fails here, with its name
    elif (Path(args.out) / "model").exists():
        # OUT/model without a checkpoint of this stage is another stage's (or another run's) result: --resume
        # would train from step 0 and replace it
        raise ValueError(f"{args.out} already holds a model (OUT/model) but no {args.stage} checkpoint; choose "
                         "another --out (nothing was overwritten)")


def _load_tokenizer(args):
    from glm5.tokenizer import Tokenizer, default_tokenizer

    if args.tokenizer:
        return Tokenizer.from_file(args.tokenizer)
    if args.init and (Path(args.init) / "tokenizer.json").is_file():
        return Tokenizer.from_file(args.init)
    return default_tokenizer()


def _model_config(args, tokenizer):
    from glm5.config import GLM5Config

    if args.init:
        return GLM5Config.from_pretrained(args.init)
    cfg = GLM5Config.from_pretrained(args.config) if args.config else GLM5Config.from_preset(args.preset)
    if cfg.vocab_size < tokenizer.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return cfg


def _build_model(args, cfg):
    from glm5.model.transformer import GLM5ForCausalLM

    if not args.init:
        return GLM5ForCausalLM(cfg)
    if cfg.extra.get("quantization_config"):  # a quantized model trains from its dequantized weights
        from glm5.quant.load import load_any_checkpoint
        from glm5.quant.lowbit_model import dequantize_model

        return dequantize_model(load_any_checkpoint(args.init))
    return GLM5ForCausalLM.from_pretrained(args.init)


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _rows(args, tokenizer):
    """The packed rows of the stage, and for SFT what packing did with the conversations (PackStats; else None)."""
    from glm5.chat import render_messages_with_mask
    from glm5.train.data import PackStats, load_conversations, load_documents, pack_conversations, pack_documents

    if args.stage == "sft":
        conversations = load_conversations(args.data)
        samples = (render_messages_with_mask(c["messages"], tokenizer, c.get("tools")) for c in conversations)
        stats = PackStats()
        rows = pack_conversations(samples, args.seq_len, tokenizer.pad_token_id or 0, truncate=args.truncate, stats=stats)
        return rows, stats
    docs = load_documents(args.data)
    eos = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack_documents(tokenizer.encode_batch(docs), args.seq_len, eos), None


def run(args: argparse.Namespace) -> int:
    import torch

    from glm5.common import keep_freed_memory, print0
    from glm5.train.config import TrainConfig
    from glm5.train.parallel import init_distributed, is_distributed, training_device
    from glm5.train.resources import check_dtype_speed, check_fits_memory
    from glm5.train.trainer import Trainer, release_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # big per-step tensors would otherwise page-fault every step
    device = training_device(args.device)
    rank, world_size = init_distributed(device)
    _check_inputs(args)
    tokenizer = _load_tokenizer(args)
    torch.manual_seed(args.seed)
    cfg = _model_config(args, tokenizer)  # checked before any weight is allocated
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's {cfg.max_position_embeddings} positions")
    check_fits_memory(cfg, args.micro_batch_size or max(1, args.batch_size // world_size), args.seq_len, device=device)
    check_dtype_speed(args.dtype, device)
    model = _build_model(args, cfg).to(device)
    if args.ternary:
        from glm5.quant.load import config_quant_method
        from glm5.train.ternary import make_ternary, shadows_from_ternary

        if config_quant_method(cfg) == "glm5-ternary":
            # continuing a ternary model: shadows whose views are its saved weights (not shrunk by absmean)
            shadows_from_ternary(model)
        print0(f"[train] ternary: {make_ternary(model)} weight tensors train through absmean-ternary views")
    rows, pack_stats = _rows(args, tokenizer)
    config = TrainConfig.from_args(args)
    trainer = Trainer(model, rows, config, args.out, rank=rank, world_size=world_size)
    print0(f"[train] {args.stage}: {len(rows)} rows x {rows.seq_len} tokens, {config.steps} steps x {config.batch_size} "
           f"rows, {world_size} process(es) on {device.type}, parallel={args.parallel}")
    if pack_stats is not None:
        print0(f"[train] {args.stage} data: {pack_stats.describe()}")
        if rank == 0:  # beside metrics.jsonl: what was read, kept, cut and dropped
            _write_json_atomic(Path(args.out) / "data.json", {**dataclasses.asdict(pack_stats), "kept": pack_stats.kept,
                                                              "rows": len(rows), "truncate": args.truncate})
    summary = trainer.run(resume=args.resume)
    # the model directory: full weights gathered on every rank (a collective under FSDP), written by rank 0
    state = trainer.state_dict()["model"] if args.parallel == "fsdp" and is_distributed() else None
    if rank == 0:
        if state is not None:  # FSDP2 sharded the model in place: write a plain copy with the gathered weights
            from glm5.model.transformer import GLM5ForCausalLM

            model = GLM5ForCausalLM(model.config)
            model.load_state_dict(state)
        release_stage(model)
        out_model = Path(args.out) / "model"
        if args.ternary:  # the shadow weights packed as glm5-ternary: the trained forward's weights exactly
            from glm5.quant.lowbit_model import save_quantized
            from glm5.train.ternary import finish_ternary

            # the unquantized rest (embeddings, heads, norms, router) in bf16, as `glm5 quantize` writes it
            save_quantized(finish_ternary(model).to(torch.bfloat16), out_model)
        else:
            model.save_pretrained(out_model)
        tokenizer.save(out_model)
        last = summary["last"] or {}
        print0(f"[train] {args.stage}: {summary['steps']} steps, loss {last.get('loss', float('nan')):.4f}; "
               f"model -> {out_model}")
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def register(subparsers) -> None:
    from glm5.common import int_at_least

    # names and defaults from glm5.train.config (no torch): `glm5 --help` builds this parser; each flag is named
    # after the TrainConfig field it sets (TrainConfig.from_args)
    from glm5.train.config import DTYPES, OPTIMIZERS, PARALLEL_MODES, SCHEDULES, STAGES

    p = subparsers.add_parser("train", help="run one training stage (pretrain, dsa-warmup, dsa-sparse, sft)")
    p.add_argument("stage", choices=STAGES, help="which stage to run")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training data: .txt/.jsonl/.parquet files or folders")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--init", metavar="DIR", help="start from this model directory (e.g. the previous stage's OUT/model)")
    source.add_argument("--config", metavar="JSON", help="start from random weights with this config.json")
    source.add_argument("--preset", default="nano", help="start from random weights of this preset (default nano)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its folder (default: --init's, else the built-in one)")
    p.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint in OUT")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="global rows per step, all processes (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="rows per forward per process; smaller means gradient accumulation (default: no accumulation)")
    p.add_argument("--seq-len", type=int_at_least(2), default=256, help="tokens per row (default 256)")
    p.add_argument("--truncate", action="store_true",
                   help="sft: cut a conversation longer than --seq-len to its first --seq-len tokens instead of leaving "
                        "it out (either way the log line and OUT/data.json count them)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--muon-lr", type=float, default=0.02, help="peak Muon learning rate (default 0.02)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw, or muon for hidden matrices + adamw (default adamw)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of matrices (default 0)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule after warm-up (default cosine)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="forward compute dtype (bf16 autocast; default float32)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (default 0.3)")
    p.add_argument("--aux-loss-weight", type=float, default=1e-4, help="weight of the sequence-wise MoE balance loss (default 1e-4)")
    p.add_argument("--bias-update-speed", type=float, default=1e-3, help="router-bias step of aux-loss-free balancing (default 1e-3)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="none", help="under torchrun: ddp or fsdp (FSDP2); default none")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this many minutes (default: no limit)")
    p.add_argument("--device", default="auto",
                   help="cpu / cuda / mps / auto (default auto: cuda, then mps, then cpu; under torchrun on GPUs "
                        "each process takes cuda:LOCAL_RANK and the processes talk over nccl, else gloo)")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads per process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--ternary", action="store_true",
                   help="1.58-bit training (BitNet b1.58): forward on absmean-ternary weights and 8-bit activations, "
                        "gradients to full-precision shadow weights; OUT/model is saved as glm5-ternary")
    p.set_defaults(func=run)
