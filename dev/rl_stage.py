"""Rerun the demo's RL stage from a finished run's model (dev tool, the experiments of dev/LOG.md).

    PYTHONPATH=. .venv/bin/python dev/rl_stage.py --run runs/demo-X --steps 40 --lr 1e-4 --out /tmp/rl_stage

Loads the demo's model after SFT (RUN/checkpoints/sft's last checkpoint into RUN/model's config and
tokenizer; `--from-model` takes RUN/model itself), scores the held-out tool-call requests (greedy), runs APRIL on the tool-call env, scores them
again, and prints per-step reward, the share of exact calls, groups with at least one success, and samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.run import RLConfig, run_rl
from glm5.tokenizer import Tokenizer
from glm5.train.checkpoints import latest_checkpoint, load_checkpoint
from glm5.train.corpus import build_demo_corpus
from glm5.train.evaluate import tool_call_eval
from glm5.train.trainer import release_stage


def _demo_defaults() -> argparse.Namespace:
    from glm5.demo import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["demo"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a demo run folder (its model/ is the start)")
    p.add_argument("--steps", type=int, default=40, help="RL steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch", type=int, default=4, help="groups per step")
    p.add_argument("--group-size", type=int, default=8, help="responses per group")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per turn")
    p.add_argument("--mode", default="april", help="sync / async / april")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--tasks", type=int, default=30, help="held-out requests")
    p.add_argument("--minutes", type=float, default=0.0, help="time budget (0: none)")
    p.add_argument("--out", default="/tmp/rl_stage", help="output folder (replaced)")
    p.add_argument("--from-model", action="store_true", help="start from RUN/model, not the SFT checkpoint")
    p.add_argument("--filter-equal", action="store_true", help="drop groups whose rewards are all equal")
    p.add_argument("--kl", type=float, default=None, help="KL coefficient to the start (default: RLConfig's)")
    p.add_argument("--seed", type=int, default=0, help="RL seed")
    p.add_argument("--keep-partial-kv", action="store_true", help="april: keep aborted episodes' KV caches")
    p.add_argument("--max-staleness", type=int, default=1, help="april / async staleness bound (default 1, the demo's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(f"{args.run}/model")
    model = GLM5ForCausalLM.from_pretrained(f"{args.run}/model")
    if not args.from_model:
        model.load_state_dict(load_checkpoint(latest_checkpoint(f"{args.run}/checkpoints/sft"))["model"])
    # the demo's defaults, so the same held-out requests
    demo = _demo_defaults()
    corpus = build_demo_corpus(stdlib_bytes=demo.stdlib_bytes, conversations=demo.conversations, tasks=args.tasks,
                               seed=demo.seed, copy_drills=demo.copy_drills, bare_share=demo.bare_share,
                               wide=demo.wide_args)
    tasks = [dict(t) for t in corpus.tasks]
    before = tool_call_eval(model, tok, tasks, max_new_tokens=args.max_new_tokens)
    print(f"before: validity {before['validity']:.2f} right tool {before['tool_accuracy']:.2f} exact {before['accuracy']:.2f}")
    shutil.rmtree(args.out, ignore_errors=True)
    config = RLConfig(out=args.out, env="tool-call", env_kwargs={"final_answer": False}, mode=args.mode,
                      steps=args.steps, rollout_batch=args.batch, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, lr=args.lr, save_every=0, progress=False,
                      temperature=args.temperature, max_minutes=args.minutes, seed=args.seed,
                      filter_equal=args.filter_equal, keep_partial_kv=args.keep_partial_kv,
                      max_staleness=args.max_staleness, **({} if args.kl is None else {"kl_coef": args.kl}))
    run_rl(config, model=model, tokenizer=tok, save_model=False)
    for line in open(f"{args.out}/metrics.jsonl"):
        r = json.loads(line)
        print(f"step {r['step']:3d} reward {r['reward_mean']:.3f} exact {r['exact_share']:.2f} groups with a success "
              f"{r['groups_with_success']} len {r['response_len_mean']:.1f} entropy {r.get('entropy', 0):.2f}")
    release_stage(model)
    after = tool_call_eval(model, tok, tasks, max_new_tokens=args.max_new_tokens)
    print(f"after: validity {after['validity']:.2f} right tool {after['tool_accuracy']:.2f} exact {after['accuracy']:.2f}")
    for s in after["samples"][:6]:
        print("  ", s["request"], "->", s["output"][:120].replace("\n", " "))
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
