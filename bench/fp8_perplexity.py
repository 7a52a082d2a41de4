"""Perplexity change of a small GLM-5 under block-wise FP8.

    .venv/bin/python bench/fp8_perplexity.py               # briefly trains `nano` on byte-level text, then compares
    .venv/bin/python bench/fp8_perplexity.py --steps 0     # a random-init model instead

Trains the `nano` preset for --steps steps on the bytes of Python standard library sources (no network, no
tokenizer), then measures held-out perplexity of: the fp32 model; its FP8 twin (glm5.quant.fp8, dequant
compute); the same with real FP8 matmuls (activations quantized per token group). Replace with the trained
checkpoint of the training pipeline once it exists (`--checkpoint DIR`).
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sysconfig
import time

import torch


def stdlib_bytes(n_bytes: int) -> bytes:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = bytearray()
    for path in files:
        with open(path, "rb") as fh:
            data += fh.read()
        if len(data) >= n_bytes:
            break
    return bytes(data[:n_bytes])


def byte_corpus(n_bytes: int) -> torch.Tensor:
    return torch.tensor(list(stdlib_bytes(n_bytes)), dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq: int) -> float:
    usable = (len(tokens) // seq) * seq
    batch = tokens[:usable].view(-1, seq)
    losses = [model(batch[i : i + 8], labels=batch[i : i + 8]).loss.item() for i in range(0, len(batch), 8)]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps before measuring (0: random init)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint directory instead of training here")
    args = parser.parse_args()

    from glm5 import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.quant.fp8 import quantize_model_fp8, set_fp8_compute

    torch.manual_seed(0)
    tokens = byte_corpus(600_000)
    train, held_out = tokens[:-65_536], tokens[-65_536:]
    if args.checkpoint:
        # a trained checkpoint (e.g. runs/<name>/model from `make demo`): score text with its own tokenizer
        from glm5.tokenizer import Tokenizer

        model = GLM5ForCausalLM.from_pretrained(args.checkpoint)
        tokenizer = Tokenizer.from_pretrained(args.checkpoint)
        from glm5.tokenizer import default_corpus

        # text the demo never trained on: its corpus and tokenizer read the first ~2.5 / 3 MB of this stream (the
        # stdlib tail an earlier version used was 81% lines the demo had pretrained on)
        held_out = torch.tensor(tokenizer.encode("".join(default_corpus(max_bytes=3_300_000))[3_000_000:]))
        print(f"checkpoint {args.checkpoint}: {len(held_out):,} held-out tokens of stdlib text")
    else:
        model = GLM5ForCausalLM(GLM5Config.from_preset("nano"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        start = time.time()
        for step in range(args.steps):
            idx = torch.randint(0, len(train) - args.seq - 1, (16,))
            batch = torch.stack([train[i : i + args.seq] for i in idx.tolist()])
            loss = model(batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    model.eval()
    base = perplexity(model, held_out, args.seq)
    fp8 = quantize_model_fp8(copy.deepcopy(model)).eval()
    dequant = perplexity(fp8, held_out, args.seq)
    set_fp8_compute(fp8, "fp8")
    real = perplexity(fp8, held_out, args.seq)
    print(f"held-out perplexity ({len(held_out):,} tokens): fp32 {base:.4f} | FP8 weights {dequant:.4f} "
          f"({dequant / base - 1:+.3%}) | FP8 weights + FP8 matmuls {real:.4f} ({real / base - 1:+.3%})")


if __name__ == "__main__":
    main()
