"""`make demo`: the CPU speedrun. From nothing to a tool-calling GLM-5 nano on 2 cores (the measured duration is
bench/results/demo.json's `wall_minutes`, the figure README.md quotes; `python bench/demo.py` measures it again).

    glm5 demo                                    # everything below, no arguments, no network
    glm5 demo --name mine --minutes 6            # a shorter budget (steps shrink to fit)
    glm5 demo --pretrain-steps 20 --sft-steps 10 # a quick look

1. corpus: Python's own docs and sources + synthetic multi-turn tool-use chats in GLM-5's format (chat-heavy)
2. tokenizer: byte-level BPE (4096 ids, GLM-5 specials) trained on that corpus
3. pretrain the nano preset (MoE + MLA + MTP, dense attention) on packed 512-token rows, every batch the
   same mix of code rows and chat rows
4. DSA dense warm-up (only the indexers train, KL to the main attention), then sparse training (top-k), which
   continues pretraining's optimizer state and learning-rate schedule
5. SFT on chats, loss on the assistant's tokens only
   Each stage scores fixed held-out probe rows before its first and after its last step, under its own
   attention: summary.json "stages" (probe_start / probe_end) and the report's stage table
6. evaluate: held-out loss, tool-call format validity and task accuracy on held-out requests; then the RL
   stage (APRIL, tool-call env) and the held-out requests scored again
7. write runs/<name>/ and point runs/latest at it (a symlink swapped in atomically at the end): model/ (safetensors + config.json + tokenizer, loadable by the engine and server),
   metrics.jsonl, report.md with plots; print a sample chat with a tool call
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

# Share of the time budget each training stage may use at most (the RL stage has its own, --rl-minutes). The
# budget is a cap, not an estimate: the default step counts finish inside it on a quiet 2-core machine (~390 /
# 30 / 90 / 180 s per stage, dev/LOG.md), and it stops a stage early only on a slower or busier machine (with
# the default BUDGET_MINUTES: pretrain 456 s, warm-up 48 s, sparse 120 s, SFT 264 s, i.e. <= 14.8 min of
# training; with the RL stage's 4 and the evals, the whole demo stays inside 20 minutes).
BUDGET_MINUTES = 20.0
BUDGET = {"pretrain": 0.38, "dsa-warmup": 0.04, "dsa-sparse": 0.10, "sft": 0.22}


def run(args: argparse.Namespace) -> int:
    import torch

    from glm5.chat import parse_output, render_messages, render_messages_with_mask
    from glm5.common import keep_freed_memory
    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import train_tokenizer
    from glm5.train.config import TrainConfig
    from glm5.train.conversations import TOOLS, run_tool
    from glm5.train.corpus import build_demo_corpus
    from glm5.train.data import PackedRows, pack_conversations, pack_documents
    from glm5.train.evaluate import generate, heldout_loss, tool_call_eval
    from glm5.train.report import stage_table, write_report
    from glm5.train.resources import check_dtype_speed, check_fits_memory
    from glm5.train.trainer import Trainer, release_stage

    check_dtype_speed(args.dtype, "cpu")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # Evaluation runs on one thread: it is short, and one thread cannot be stalled at a barrier by another
    # busy process the way several are (see ThreadGovernor in glm5/train/trainer.py)
    eval_threads = args.threads or 1
    if not 0 <= args.bare_share <= 1:
        raise ValueError(f"--bare-share {args.bare_share}: must be between 0 and 1")
    if not args.minutes >= 0:
        raise ValueError(f"--minutes {args.minutes}: must be >= 0 (0: no time limit)")
    name = args.name or time.strftime("demo-%Y%m%d-%H%M%S")
    if name == LATEST:
        raise ValueError(f"--name {LATEST}: that name is the link to the newest run; pick another")
    run_dir = Path(args.out) / name
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"{run_dir} already exists (a file, or a folder that is not empty); pick another --name (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)  # a file in the way fails here, not after the corpus and tokenizer
    torch.manual_seed(args.seed)
    keep_freed_memory()  # big per-step tensors would otherwise page-fault every step (glm5.common)
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(message: str) -> None:
        print(f"[demo {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    # 1-2: corpus and tokenizer
    corpus = build_demo_corpus(stdlib_bytes=args.stdlib_bytes, conversations=args.conversations, tasks=args.tasks,
                               seed=args.seed, copy_drills=args.copy_drills, bare_share=args.bare_share,
                               wide=args.wide_args)
    say(f"corpus: {corpus.summary()}")
    tokenizer = train_tokenizer(iter(corpus.train_texts), args.vocab_size)
    say(f"tokenizer: {tokenizer.vocab_size} ids trained")
    eos = tokenizer.special_token_id("<|endoftext|>")
    # allow_special: the rendered chats must carry <|assistant|>, <tool_call>... as their special ids, exactly as
    # SFT and generation see them (encoded as plain text, pretraining taught SFT nothing: its loss began at 7.5).
    # The stdlib text holds none of those strings.
    # code and chats are packed apart and every batch takes both in a fixed proportion (stratified): a chat row
    # scores ~0.2 and a code row ~5, so with a random mix a 4-row step's loss swung 1-4 with its share of chats
    # By default the pretraining rows are the chats alone: with a fifth of each batch stdlib text, a nano model
    # had not learned to copy an argument after 400 steps (argument NLL 2.65), on the chats alone it had (1.73,
    # exact calls 0.63 by 600; dev/LOG.md). The stdlib text still trains the tokenizer and is scored held out.
    pretrain_rows = PackedRows.concat([
        pack_documents(tokenizer.encode_batch(texts, allow_special=True), args.seq_len, eos)
        for texts in ((corpus.train_code, corpus.train_chats) if args.pretrain_code else (corpus.train_chats,))])
    heldout_rows = pack_documents(tokenizer.encode_batch(corpus.heldout_texts), args.seq_len, eos)
    heldout_chat_rows = pack_documents(tokenizer.encode_batch(corpus.heldout_chats, allow_special=True), args.seq_len, eos)

    def sft_rows(conversations):
        samples = (render_messages_with_mask(c["messages"], tokenizer, c.get("tools")) for c in conversations)
        return pack_conversations(samples, args.sft_seq_len, tokenizer.pad_token_id)

    sft_train, sft_heldout = sft_rows(corpus.sft_train), sft_rows(corpus.sft_heldout)
    # fixed probe rows each stage scores under its own attention before its first and after its last step
    # (same rows, same attention mode at both ends: the stage's effect without batch noise)
    probe_rows = PackedRows.concat([heldout_rows.take(slice(0, args.probe_rows * 2 // 3)),
                                    heldout_chat_rows.take(slice(0, args.probe_rows - args.probe_rows * 2 // 3))])
    sft_probe_rows = sft_heldout.take(slice(0, args.probe_rows))
    say(f"packed: pretraining {len(pretrain_rows)} x {args.seq_len} tokens (held out {len(heldout_rows)}), "
        f"SFT {len(sft_train)} x {args.sft_seq_len} (held out {len(sft_heldout)})")

    # 3: the model
    cfg = GLM5Config.from_preset(args.preset, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_ids,
                                 pad_token_id=tokenizer.pad_token_id)
    check_fits_memory(cfg, args.batch_size, max(args.seq_len, args.sft_seq_len))
    model = GLM5ForCausalLM(cfg)
    say(f"model: {args.preset} preset, {model.num_parameters() / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
        f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
        f"DSA top-{cfg.index_topk}, {cfg.num_nextn_predict_layers} MTP layer")

    budget_minutes = args.minutes
    common = dict(batch_size=args.batch_size, seed=args.seed, log_every=1, dtype=args.dtype, optimizer=args.optimizer,
                  adaptive_threads=not args.threads, probe_threads=eval_threads)
    plan = [
        # pretraining's cosine stops at 0.3 x peak and the sparse stage, which continues it with the same AdamW
        # moments, carries the schedule on down to 0.1 x peak: one schedule over both. With pretraining decayed
        # to 0.1 and a fresh AdamW in the sparse stage, the sparse stage raised the held-out loss (dev/LOG.md)
        ("pretrain", pretrain_rows, dict(steps=args.pretrain_steps, lr=args.lr, warmup=20, min_lr_ratio=0.3)),
        ("dsa-warmup", pretrain_rows, dict(steps=args.warmup_steps, lr=5e-3, warmup=5, optimizer="adamw")),
        ("dsa-sparse", pretrain_rows, dict(steps=args.sparse_steps, lr=args.lr * 0.3, warmup=0, min_lr_ratio=1 / 3)),
        ("sft", sft_train, dict(steps=args.sft_steps, lr=args.lr / 3, warmup=5, batch_size=args.sft_batch_size)),
    ]
    summaries, trainers = {}, {}

    def scored(fn, *fn_args, **fn_kwargs):
        torch.set_num_threads(eval_threads)
        try:
            return fn(*fn_args, **fn_kwargs)
        finally:
            torch.set_num_threads(args.threads or threads)

    heldout_by_stage = {"start": {name: scored(heldout_loss, model, held, max_rows=args.heldout_rows) for name, held in
                                  (("stdlib", heldout_rows), ("chats", heldout_chat_rows), ("sft", sft_heldout))}}
    heldout_before = heldout_by_stage["start"]["stdlib"]
    for stage, rows, overrides in plan:
        if overrides["steps"] <= 0:
            continue
        config = TrainConfig(stage=stage, max_minutes=budget_minutes * BUDGET[stage], **{**common, **overrides})
        say(f"{stage}: {config.steps} steps x {config.batch_size} rows x {rows.seq_len} tokens")
        probe = sft_probe_rows if stage == "sft" else probe_rows
        trainer = Trainer(model, rows, config, run_dir, probe=probe)
        if stage == "dsa-sparse" and "pretrain" in trainers:
            # the sparse stage continues pretraining (the warm-up between trained only the indexers): it keeps
            # pretraining's AdamW moments; a fresh AdamW's first steps alone raised the held-out loss (dev/LOG.md)
            trainer.adopt_optimizer_state(trainers["pretrain"])
        summary = trainer.run()
        summaries[stage], trainers[stage] = summary, trainer
        note = " (stopped early: time budget)" if summary["stopped_early"] else ""
        # batch losses are noisy (a batch of chats scores far lower than one of stdlib code): held-out sets
        # scored after every stage show what each stage did
        after = {name: scored(heldout_loss, model, held, max_rows=args.heldout_rows) for name, held in
                 (("stdlib", heldout_rows), ("chats", heldout_chat_rows), ("sft", sft_heldout))}
        heldout_by_stage[stage] = after
        say(f"{stage}: loss {summary['first']['loss']:.3f} -> {summary['last']['loss']:.3f} in {summary['steps']} steps, "
            f"{summary['seconds']:.0f}s{note}; fixed probe rows {summary['probe_start']['loss']:.3f} -> "
            f"{summary['probe_end']['loss']:.3f}; held-out loss after it: "
            + ", ".join(f"{k} {v:.3f}" for k, v in after.items()))
    trainers.clear()  # their optimizer states
    release_stage(model)

    # 6: evaluation
    final = {"held-out loss, stdlib text (before training)": f"{heldout_before:.3f}",
             "held-out loss, stdlib text": f"{scored(heldout_loss, model, heldout_rows, max_rows=args.heldout_rows):.3f}",
             "held-out loss, rendered chats": f"{scored(heldout_loss, model, heldout_chat_rows, max_rows=args.heldout_rows):.3f}",
             "held-out loss, SFT assistant tokens": f"{scored(heldout_loss, model, sft_heldout, max_rows=args.heldout_rows):.3f}"}
    tasks = scored(tool_call_eval, model, tokenizer, [dict(t) for t in corpus.tasks], max_new_tokens=args.max_new_tokens)
    final["tool-call validity"] = f"{tasks['validity']:.2f} ({len(corpus.tasks)} held-out requests)"
    final["task accuracy (right tool)"] = f"{tasks['tool_accuracy']:.2f}"
    final["task accuracy (exact tool + arguments)"] = f"{tasks['accuracy']:.2f}"
    say("eval: " + ", ".join(f"{k} {v}" for k, v in final.items()))
    rl = rl_stage(model, tokenizer, run_dir, args, corpus.tasks, tasks, scored, say)

    # 7: the model directory, a sample chat, the report
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save(model_dir)
    messages = [{"role": "user", "content": args.sample_request}]
    sample_lines = [f"user: {args.sample_request}"]
    torch.set_num_threads(eval_threads)
    reply = generate(model, tokenizer, [render_messages(messages, TOOLS)], max_new_tokens=args.max_new_tokens)[0]
    parsed = parse_output(reply, TOOLS)
    sample_lines.append(f"assistant (raw): {reply}")
    if parsed.tool_calls and parsed.tool_calls[0].valid:
        call = parsed.tool_calls[0]
        try:
            result, _ = run_tool(random.Random(args.seed), call.name, call.arguments)
        except (KeyError, TypeError, ValueError):
            result = {"error": "the tool could not run these arguments"}
        messages.append(parsed.to_message())
        messages.append({"role": "tool", "content": json.dumps(result)})
        sample_lines.append(f"tool {call.name}({call.arguments_json}) -> {json.dumps(result)}")
        answer = generate(model, tokenizer, [render_messages(messages, TOOLS)], max_new_tokens=args.max_new_tokens,
                          stop_strings=())[0]
        sample_lines.append(f"assistant: {parse_output(answer, TOOLS).content or answer}")
    sample_chat = "\n".join(sample_lines)
    wall = time.perf_counter() - started
    final["wall time"] = f"{wall / 60:.1f} min"
    probes = {stage: {"start": summary["probe_start"], "end": summary["probe_end"]} for stage, summary in summaries.items()}
    from glm5.model.moe import MoE

    moe_layers = [n for n, m in model.named_modules() if isinstance(m, MoE)]  # the order of losses.moe_modules
    report = write_report(run_dir, {
        "name": name, "probes": probes, "moe_layers": moe_layers, "final": final, "heldout_by_stage": heldout_by_stage, "sample_chat": sample_chat, "eval_samples": tasks["samples"],
        "description": f"`glm5 demo`: {args.preset} preset, {model.num_parameters() / 1e6:.2f}M parameters, "
                       f"tokenizer {tokenizer.vocab_size} ids; corpus: {corpus.summary()}.",
    })
    stages = stage_table([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], probes)
    with open(report, "a") as f:
        f.write("\n" + rl.pop("report_section", ""))
    (run_dir / "summary.json").write_text(json.dumps({"final": final, "heldout_by_stage": heldout_by_stage, "stages": stages,
                                                     "rl": rl, "wall_minutes": round(wall / 60, 2)},
                                                     indent=2) + "\n")
    print("\n" + "=" * 72 + "\nSample chat (greedy, the trained model):\n" + sample_chat + "\n" + "=" * 72)
    print(f"model:   {model_dir}  (GLM5ForCausalLM.from_pretrained / Tokenizer.from_file)")
    print(f"report:  {report}  (plots in {run_dir / 'plots'})")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    latest = point_latest_at(run_dir)
    print(f"latest:  {latest} -> {run_dir.name}  (LLM.from_pretrained(\"{latest / 'model'}\"))")
    print(f"done in {wall / 60:.1f} min")
    return 0


LATEST = "latest"


def point_latest_at(run_dir: Path) -> Path:
    """Make OUT/latest a symlink to run_dir, swapped in atomically (a new link beside it, then a rename over the
    old one), so a reader never sees it missing or half-written. Returns the link's path."""
    import os

    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        raise ValueError(f"{link} exists and is not a symlink; move it away so the demo can point it at its newest run")
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp, target_is_directory=True)  # relative: the runs folder can move
    os.replace(tmp, link)
    return link


def register(subparsers) -> None:
    from glm5.common import int_at_least
    from glm5.train.config import DTYPES, OPTIMIZERS

    p = subparsers.add_parser("demo", help="the CPU speedrun: corpus, tokenizer, pretrain, DSA, SFT, eval, report (no arguments needed)")
    p.add_argument("--name", default=None, help="run name; output goes to OUT/NAME, and OUT/latest points at it when done (default demo-<date>-<time>)")
    p.add_argument("--out", default="runs", help="folder for runs (default runs)")
    p.add_argument("--preset", default="nano", help="model preset (default nano)")
    p.add_argument("--minutes", type=float, default=BUDGET_MINUTES,
                   help=f"time budget, a cap for slow or busy machines: each stage stops early past its share of it "
                        f"(0: no limit; default {BUDGET_MINUTES:g})")
    p.add_argument("--pretrain-steps", type=int, default=550, help="pretraining steps (default 550)")
    p.add_argument("--warmup-steps", type=int, default=50, help="DSA dense warm-up steps (default 50)")
    p.add_argument("--sparse-steps", type=int, default=100, help="DSA sparse-stage steps (default 100)")
    p.add_argument("--sft-steps", type=int, default=100, help="SFT steps (default 100)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="rows per pretraining / DSA step (default 4)")
    p.add_argument("--sft-batch-size", type=int_at_least(1), default=8, help="rows per SFT step (default 8)")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per pretraining row; a whole chat (280-380) fits, so SFT meets no unseen positions (default 512)")
    p.add_argument("--sft-seq-len", type=int_at_least(2), default=512, help="tokens per SFT row; a chat with its tools block and 1-3 calls is 280-510 (default 512)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate of pretraining (default 3e-3)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer (default adamw)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size (default 4096)")
    # the pretraining mix is ~1/5 stdlib text and ~4/5 chats (batches are stratified by the two sets' sizes): a
    # nano model needs ~2,400 rows of chats to learn to copy arguments out of requests (dev/LOG.md)
    p.add_argument("--stdlib-bytes", type=int, default=1_000_000, help="bytes of Python stdlib text (default 1M)")
    p.add_argument("--conversations", type=int, default=9000, help="synthetic chats in the pretraining corpus (default 9000)")
    p.add_argument("--pretrain-code", action="store_true", help="pretrain on the stdlib text too, a fixed share of "
                   "every batch (default: the chats alone; the stdlib text trains the tokenizer and is held out)")
    p.add_argument("--wide-args", action="store_true", help="draw half the training chats' names made up and their "
                   "numbers up to 999 (multi-token names to copy: harder; the eval keeps the real names)")
    p.add_argument("--bare-share", type=float, default=0.8, help="share of the pretraining chats without their ~230-token "
                   "tools block: more requests and calls per token (default 0.8)")
    p.add_argument("--probe-rows", type=int, default=24, help="fixed held-out rows each stage scores at its start and end "
                   "(2/3 stdlib, 1/3 chats; SFT: held-out conversations) (default 24)")
    p.add_argument("--heldout-rows", type=int, default=48, help="rows of each held-out set scored (default 48)")
    p.add_argument("--copy-drills", type=int, default=0, help="short list-then-repeat documents in pretraining, an induction curriculum (default 0)")
    p.add_argument("--tasks", type=int, default=30, help="held-out tool-call requests in the eval (default 30)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="generation length in the eval (default 40)")
    p.add_argument("--sample-request", default="What is the weather in Lisbon?", help="the user turn of the sample chat")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads, fixed (default: torch's choice, dropping to 1 while other processes load the CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--rl-steps", type=int, default=40, help="RL steps after SFT (APRIL, tool-call env; 0: none; default 40)")
    p.add_argument("--rl-minutes", type=float, default=4.0, help="time budget of the RL stage (default 4)")
    p.add_argument("--rl-batch", type=int_at_least(1), default=4, help="RL prompts (groups) per step (default 4)")
    p.add_argument("--rl-group-size", type=int_at_least(2), default=8, help="RL responses per prompt (default 8)")
    p.add_argument("--rl-lr", type=float, default=5e-5, help="RL AdamW learning rate (default 5e-5; 2e-4 lowered the "
                   "held-out exact calls, dev/LOG.md)")
    p.set_defaults(func=run)


def rl_stage(model, tokenizer, run_dir: Path, args: argparse.Namespace, tasks: list[dict], before: dict, scored,
             say) -> dict:
    """The RL stage after SFT: APRIL on the `tool-call` env (training-split requests), then the held-out
    requests scored again. -> summary.json's "rl": exact-call accuracy before / after, validity after, steps."""
    from glm5.rl.report import plot_rl
    from glm5.rl.run import RLConfig, run_rl
    from glm5.train.evaluate import tool_call_eval
    from glm5.train.report import read_metrics
    from glm5.train.trainer import release_stage

    if args.rl_steps <= 0:
        return {"exact_call_before": before["accuracy"], "exact_call_after": before["accuracy"],
                "tool_validity_after": before["validity"], "steps": 0}
    config = RLConfig(out=str(run_dir / "rl"), env="tool-call", env_kwargs={"final_answer": False}, algo="grpo",
                      mode="april", steps=args.rl_steps, rollout_batch=args.rl_batch, group_size=args.rl_group_size,
                      max_new_tokens=args.max_new_tokens, over_sample=2.0, keep_partial_kv=True, max_staleness=1,
                      lr=args.rl_lr,
                      seed=args.seed, save_every=0, threads=args.threads or 1, max_minutes=args.rl_minutes)
    say(f"rl: april, tool-call env, up to {config.steps} steps x {config.rollout_batch} groups x "
        f"{config.group_size} responses, {config.max_minutes:g} min")
    summary = run_rl(config, model=model, tokenizer=tokenizer, save_model=False)
    release_stage(model)
    after = scored(tool_call_eval, model, tokenizer, [dict(t) for t in tasks], max_new_tokens=args.max_new_tokens)
    records = read_metrics(run_dir / "rl" / "metrics.jsonl")
    plots = plot_rl(records, run_dir / "plots") if records else []
    result = {"exact_call_before": before["accuracy"], "exact_call_after": after["accuracy"],
              "tool_validity_after": after["validity"], "steps": summary["steps"]}
    say(f"rl: {summary['steps']} steps, reward {summary['reward_first'] or 0:.3f} -> {summary['reward_last'] or 0:.3f}; "
        f"held-out exact-call accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
        f"validity {after['validity']:.2f}")
    result["report_section"] = "\n".join(
        ["## Reinforcement learning (APRIL, tool-call env)", "",
         f"{summary['steps']} steps; held-out exact-call accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
         f"tool-call validity after {after['validity']:.2f}; per-step metrics in rl/metrics.jsonl.", ""]
        + [f"![{title}](plots/{name})" for title, name in plots] + [""])
    return result
