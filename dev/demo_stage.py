"""Iterate on one demo stage from a finished run's checkpoint (dev tool, not part of `make demo`).

    PYTHONPATH=. .venv/bin/python dev/demo_stage.py --run runs/demo5 --start dsa-warmup --stage dsa-sparse \
        --steps 60 --lr 1e-3 --out /tmp/x

Rebuilds the demo corpus with the run's tokenizer (default corpus arguments), loads the model weights of the
last checkpoint of stage --start, trains --stage on the demo's data for it (stratified code/chat rows unless
--no-stratify), scores the fixed probe rows before and after, and (for sft) runs the tool-call eval.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm5.chat import render_messages_with_mask
from glm5.config import GLM5Config
from glm5.model.transformer import GLM5ForCausalLM
from glm5.tokenizer import Tokenizer
from glm5.train.checkpoints import latest_checkpoint, load_checkpoint
from glm5.train.config import TrainConfig
from glm5.train.corpus import build_demo_corpus
from glm5.train.data import PackedRows, pack_conversations, pack_documents
from glm5.train.evaluate import heldout_loss, tool_call_eval
from glm5.train.trainer import Trainer, release_stage


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="/work/main/runs/demo5")
    p.add_argument("--start", default="dsa-warmup")
    p.add_argument("--stage", default="dsa-sparse")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sft-seq-len", type=int, default=384)
    p.add_argument("--no-stratify", action="store_true")
    p.add_argument("--carry", action="store_true", help="continue the pretraining optimizer's moments")
    p.add_argument("--drill-rows", type=int, default=0,
                   help="SFT: this many rows of each batch are echo drills (user lists names/numbers, assistant repeats them)")
    p.add_argument("--dense", action="store_true", help="train and evaluate with dense attention (diagnostic)")
    p.add_argument("--wide", action="store_true", help="training chats with made-up names / big numbers")
    p.add_argument("--tasks", type=int, default=30)
    p.add_argument("--conversations", type=int, default=1500)
    p.add_argument("--sft-conversations", type=int, default=2000)
    p.add_argument("--out", default="/tmp/demo_stage")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(f"{args.run}/model")
    corpus = build_demo_corpus(stdlib_bytes=2_500_000, conversations=args.conversations, tasks=args.tasks, seed=0,
                               sft_conversations=args.sft_conversations, wide=args.wide)
    eos = tok.special_token_id("<|endoftext|>")
    code = [t for t in corpus.train_texts if not t.startswith("[gMASK]")]
    chats = [t for t in corpus.train_texts if t.startswith("[gMASK]")]
    code_rows = pack_documents(tok.encode_batch(code, allow_special=True), args.seq_len, eos)
    chat_rows = pack_documents(tok.encode_batch(chats, allow_special=True), args.seq_len, eos)
    if args.no_stratify:
        rows = pack_documents(tok.encode_batch(corpus.train_texts, allow_special=True), args.seq_len, eos)
    else:
        rows = PackedRows.concat([code_rows, chat_rows])
    held = pack_documents(tok.encode_batch(corpus.heldout_texts), args.seq_len, eos)
    held_chats = pack_documents(tok.encode_batch(corpus.heldout_chats, allow_special=True), args.seq_len, eos)

    def sft_rows(convs):
        return pack_conversations((render_messages_with_mask(c["messages"], tok, c.get("tools")) for c in convs),
                                  args.sft_seq_len, tok.pad_token_id)

    sft_train, sft_held = sft_rows(corpus.sft_train), sft_rows(corpus.sft_heldout)
    if args.drill_rows:
        import random

        from glm5.train.conversations import CAPITALS, CITIES, made_up_name

        rng = random.Random(1)

        def item():
            kind = rng.random()
            if kind < 0.35:
                return made_up_name(rng)
            if kind < 0.6:
                return rng.choice(CITIES + sorted(CAPITALS))
            return str(rng.randint(0, 999))

        drills = []
        for _ in range(6000):
            seq = " ".join(item() for _ in range(rng.randint(1, 5)))
            drills.append({"messages": [{"role": "user", "content": f"Repeat: {seq}"},
                                        {"role": "assistant", "content": seq}]})
        drill_rows = sft_rows(drills)
        share = args.drill_rows / args.batch_size
        n_drill = max(1, int(len(sft_train) * share / (1 - share)))
        sft_train = PackedRows.concat([sft_train, drill_rows.take(slice(0, n_drill))])
        print(f"drill rows {len(drill_rows)} (using {n_drill}), e.g. {drills[0]['messages']}", flush=True)
    probe = sft_held.take(slice(0, 24)) if args.stage == "sft" else PackedRows.concat([held.take(slice(0, 16)), held_chats.take(slice(0, 8))])
    print(f"data ready {time.perf_counter() - t0:.0f}s: code {len(code_rows)} chat {len(chat_rows)} rows; sft {len(sft_train)}", flush=True)
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    model = GLM5ForCausalLM(cfg)
    model.load_state_dict(load_checkpoint(latest_checkpoint(f"{args.run}/checkpoints/{args.start}"))["model"])
    conf = TrainConfig(stage=args.stage, steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
                       min_lr_ratio=args.min_lr_ratio, progress=False)
    import shutil
    shutil.rmtree(args.out, ignore_errors=True)
    trainer = Trainer(model, sft_train if args.stage == "sft" else rows, conf, args.out, probe=probe)
    if args.carry:
        from glm5.train.optim import build_optimizer
        from glm5.train.trainer import configure_stage

        configure_stage(model, "pretrain")
        previous = build_optimizer(model, "adamw")
        previous.load_state_dict(load_checkpoint(latest_checkpoint(f"{args.run}/checkpoints/pretrain"))["optimizer"])
        configure_stage(model, args.stage)
        print("carried optimizer state of", trainer.adopt_optimizer_state(previous), "parameters")
    from glm5.train import losses as train_losses

    def densify():
        for attn in train_losses.attention_modules(model):
            attn.dense_attention, attn.indexer_loss_mode = True, None

    if args.dense:
        densify()
    summary = trainer.run()
    recs = [json.loads(line) for line in open(f"{args.out}/metrics.jsonl")]
    losses = [r["loss"] for r in recs]
    means = [sum(losses[i:i + 10]) / len(losses[i:i + 10]) for i in range(0, len(losses), 10)]
    print(f"{args.stage} {args.steps} steps lr {args.lr} bs {args.batch_size}: {summary['seconds']:.0f}s")
    print("probe start", {k: round(v, 4) if isinstance(v, float) else v for k, v in summary["probe_start"].items()})
    print("probe end  ", {k: round(v, 4) if isinstance(v, float) else v for k, v in summary["probe_end"].items()})
    print("10-step means", " ".join(f"{m:.3f}" for m in means))
    out = {n: round(heldout_loss(model, r, max_rows=48), 4) for n, r in (("stdlib", held), ("chats", held_chats), ("sft", sft_held))}
    print("held-out (stage attention)", out)
    if args.stage == "sft":
        release_stage(model)
        if args.dense:
            densify()
        res = tool_call_eval(model, tok, [dict(t) for t in corpus.tasks], max_new_tokens=40)
        print(f"validity {res['validity']:.2f} accuracy {res['accuracy']:.2f}")
        for s in res["samples"][:8]:
            print("  ", s["request"], "->", s["output"][:150].replace("\n", " "))
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
