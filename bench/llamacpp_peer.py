"""llama.cpp as a benchmark peer: a glm5 model exported to GGUF, opened in llama-cpp-python, run greedy.

    from llamacpp_peer import import_llama_cpp, export_model, open_llama, run_llama, BatchedLlama
    llama_cpp, why = import_llama_cpp()              # (None, "reason") when llama-cpp-python is missing
    path = export_model(model, work_dir)             # a GLM5ForCausalLM in memory (or a checkpoint dir) -> f32 GGUF
    llm = open_llama(path, n_ctx=300, n_batch=128, threads=2)
    ttft, total, tokens = run_llama(llm, prompt, 128)          # one sequence: llama.cpp's eval loop
    with BatchedLlama(path, n_seq=8, n_ctx_seq=300, n_batch=1024, threads=2) as batched:
        ttft, total, rows = batched.run(prompts, 128)          # 8 sequences in one llama_batch per step

Used by bench/llamacpp.py (glm5 vs llama.cpp, prefill and decode per GGUF type) and bench/generate.py (llama.cpp
as the second peer beside transformers). What makes llama.cpp's numbers glm5's (dev/LOG.md, "GGUF export and
llama.cpp parity"): f32 K/V caches (`type_k = type_v = 0`; the default f16 caches hold the MLA latent and the
indexer keys to 11 bits, which alone moves logits by ~1e-3), the same token ids (the tokenizer is embedded), and
few threads: ggml's worker threads spin at a barrier, so more threads than free cores stall it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0  # ggml_type of the K/V caches: f32, as glm5 keeps them


@contextlib.contextmanager
def _quiet():
    """llama.cpp's loader writes its log to the process's stderr (not through Python): silence the file
    descriptor meanwhile, as Llama(verbose=False) does."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_llama_cpp():
    """(the llama_cpp module, None), or (None, why it cannot be used)."""
    try:
        import llama_cpp
    except ImportError as err:  # also a build whose shared library does not load
        return None, f"llama-cpp-python cannot be imported ({err}); `make llama-cpp` builds it"
    return llama_cpp, None


def save_for_export(model, directory: str | Path) -> Path:
    """Write `model` (a GLM5ForCausalLM) and glm5's default tokenizer as a checkpoint directory that
    `glm5 export gguf` reads: the tokenizer goes into the GGUF, so its ids must fit the model's vocab."""
    from glm5.tokenizer import default_tokenizer

    tok = default_tokenizer()
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the default tokenizer has {tok.vocab_size} ids, the model's vocab_size is "
                         f"{model.config.vocab_size}: a GGUF needs every token id in the vocab")
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


def export_model(model_or_dir, work: str | Path, out_type: str = "f32") -> Path:
    """`model_or_dir` (a checkpoint directory, or a GLM5ForCausalLM first saved under work/model) as
    work/model-{out_type}.gguf, written by glm5's GGUF exporter (GGUFExportError names a config llama.cpp
    cannot run, e.g. index_head_dim < 64)."""
    from glm5.quant.gguf import export_gguf

    work = Path(work)
    model_dir = Path(model_or_dir) if isinstance(model_or_dir, (str, Path)) else save_for_export(model_or_dir, work / "model")
    return export_gguf(model_dir, work / f"model-{out_type}.gguf", out_type=out_type, overwrite=True)


def open_llama(path: str | Path, *, n_ctx: int, n_batch: int, threads: int):
    """llama-cpp-python's Llama on `path` for one sequence: f32 caches, every position's logits kept (`scores`),
    `threads` for decode (n_threads) and prompt processing (n_threads_batch)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False, type_k=GGML_TYPE_F32,
                           type_v=GGML_TYPE_F32)


def run_llama(llm, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """Greedy, one sequence, llama.cpp's eval loop: (time to the first new token, total time, the new tokens).
    `llm.scores` keeps every position's logits afterwards."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out = [int(np.argmax(llm.scores[len(prompt) - 1]))]
    first = time.perf_counter() - t
    for _ in range(new - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return first, time.perf_counter() - t, out


def llama_logits(llm, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `prompt` + `continuation`, computed as run_llama computes them:
    the prompt in one eval, then one token at a time."""
    llm.reset()
    llm.eval(prompt)
    for token in continuation:
        llm.eval([token])
    return np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


class BatchedLlama:
    """Several sequences decoded together through llama.cpp's batch API (`llama_decode` on a `llama_batch` whose
    tokens carry sequence ids 0..n_seq-1), as llama.cpp's server runs parallel slots: one prefill batch of every
    prompt, then one batch of n_seq tokens per step. The context has n_seq sequences of n_ctx_seq positions (a
    K/V stream each: llama.cpp's default, non-unified cache) in f32."""

    def __init__(self, path: str | Path, *, n_seq: int, n_ctx_seq: int, n_batch: int, threads: int):
        import llama_cpp

        self.lib, self.n_seq, self.n_batch = llama_cpp, n_seq, n_batch
        llama_cpp.llama_backend_init()
        with _quiet():
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_seq * n_ctx_seq, n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = GGML_TYPE_F32
        params.no_perf = True
        with _quiet():
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {n_seq} x {n_ctx_seq} positions")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        if self.ctx:
            with _quiet():
                self.lib.llama_batch_free(self.batch)
                self.lib.llama_free(self.ctx)
                self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if (rc := self.lib.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        row = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,))))

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
        """Greedy: (time to the first new token of every sequence, total time, the new tokens per prompt)."""
        if len(prompts) > self.n_seq:
            raise ValueError(f"{len(prompts)} prompts for a context of {self.n_seq} sequences")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        entries = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        t = time.perf_counter()
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(entries), self.n_batch):  # the prompts, n_batch tokens per llama_decode
            chunk = entries[start:start + self.n_batch]
            self._decode(chunk)
            for i, (_, _, seq, last) in enumerate(chunk):
                if last:
                    out[seq].append(self._argmax(i))
        first = time.perf_counter() - t
        for _ in range(new - 1):
            self._decode([(row[-1], len(p) + len(row) - 1, seq, True) for seq, (p, row) in enumerate(zip(prompts, out))])
            for seq, row in enumerate(out):
                row.append(self._argmax(seq))
        return first, time.perf_counter() - t, out


def first_mismatch(model, llm, prompt: list[int], ours: list[int], theirs: list[int]) -> dict | None:
    """None when glm5's greedy tokens (`ours`) and llama.cpp's (`theirs`) are equal; else where they first part
    (`at`, a new-token index) and why. At that position: glm5's logit for its token minus its logit for llama.cpp's
    (`glm5_gap`, from `model`'s forward over the common prefix), the reverse on llama.cpp's side (`llamacpp_gap`,
    from `llm`, a Llama from open_llama, teacher-forced) and the logits' scale. Over every position of prompt +
    common prefix: the median and the largest difference between the two sides' logits and where the largest is
    (`largest_diff_position`, counted from the prompt's first token). Logits that agree to fp32 rounding except
    from one position on point at a selection there (DSA's top-k or the router) whose k-th and (k+1)-th scores
    tie within rounding: any two fp32 summation orders may break it either way; both gaps small is a near-tie of
    the logits themselves."""
    import torch

    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if at is None:
        return None if len(ours) == len(theirs) else {"at": min(len(ours), len(theirs)), "lengths": [len(ours), len(theirs)]}
    device = next(model.parameters()).device
    with torch.no_grad():
        mine = model(torch.tensor([prompt + ours[:at]], device=device)).logits[0].float().cpu().numpy()
    other = llama_logits(llm, prompt, ours[:at])
    diff = np.abs(mine - other).max(axis=-1)
    a, b = ours[at], theirs[at]
    return {"at": at, "glm5_token": a, "llamacpp_token": b, "glm5_gap": float(mine[-1, a] - mine[-1, b]),
            "llamacpp_gap": float(other[-1, b] - other[-1, a]), "logit_scale": float(np.abs(mine).max()),
            "median_logit_diff": float(np.median(diff)), "largest_logit_diff": float(diff.max()),
            "largest_diff_position": int(diff.argmax())}


def describe_mismatch(first: dict) -> str:
    """first_mismatch's dict as one line."""
    if "glm5_gap" not in first:
        return f"lengths differ: {first['lengths']}"
    return (f"greedy tokens part at new token {first['at']}: glm5's logit gap between the two candidates "
            f"{first['glm5_gap']:.3g}, llama.cpp's {first['llamacpp_gap']:.3g} (logit scale {first['logit_scale']:.3g}); "
            f"logits differ by {first['median_logit_diff']:.2g} at the median position, at most "
            f"{first['largest_logit_diff']:.2g} (position {first['largest_diff_position']})")
