"""llama.cpp runs glm5's GGUF export and computes what glm5 computes (llama-cpp-python as the oracle).

- f32: a demo-sized model, prompts longer than index_topk (DSA's top-k active in prefill and decode): greedy
  tokens identical for 32 new tokens and last-position logits within fp32 rounding of their scale.
- q8_0 / q4_k: llama.cpp on the quantized file against glm5 on the same file read back (dequantized), with
  the tolerance of llama.cpp's own activation rounding (it multiplies q8_0-quantized activations by the
  quantized weights), and against the unquantized model with the format's own.
- text: the embedded tokenizer gives llama.cpp the ids glm5.tokenizer gives, special tokens included.
- llama.cpp's own converter (vendored in llama-cpp-python's source archive) on our save_pretrained output
  writes a file that llama.cpp runs to the same tokens.
- bench/llamacpp_peer.py, llama.cpp as bench/generate.py and bench/llamacpp.py run it: a model in memory
  exported, one sequence through the eval loop and two through one llama_batch per step, greedy tokens glm5's.

Skipped with a reason when llama-cpp-python is not installed (`make test` builds it once per CPU).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp builds it)")

from conftest import randomize_  # noqa: E402

from glm5 import GLM5Config, GLM5ForCausalLM  # noqa: E402
from glm5.engine import LLM, SamplingParams  # noqa: E402
from glm5.quant.gguf import export_gguf, load_gguf_model  # noqa: E402
from glm5.tokenizer import SPECIAL_TOKENS, default_tokenizer  # noqa: E402

NEW_TOKENS = 32
GGML_TYPE_F32 = 0
PROMPT_SEED = 7
# The smallest gap, relative to the row's scale, that the test's sequence must keep between the k-th and
# (k+1)-th indexer scores and between the k-th and (k+1)-th router choices: 40x fp32's rounding of a score.
# At a gap below rounding, any two correct implementations may pick different keys or experts (see below).
MIN_SELECTION_GAP = 1e-5


def _llama(path, **kw):
    # The latent and indexer-key caches in f32 like glm5's: llama.cpp's default f16 caches round them to 11 bits,
    # which alone moves logits by ~1e-3 and flips top-k choices. One thread: ggml's spinning thread barrier
    # stalls when the machine runs more threads than cores.
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1,
                           n_threads_batch=1, logits_all=True, verbose=False, type_k=GGML_TYPE_F32,
                           type_v=GGML_TYPE_F32, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A demo-sized model (the nano preset, as `make demo` trains it) with weights large enough
    that every path matters. The indexer's head weights are positive, so a score is 0 only when every head's dot
    product is negative, and exact ties at the k-th score (which llama.cpp and glm5 break differently) are rare."""
    tok = default_tokenizer()
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size)
    model = randomize_(GLM5ForCausalLM(cfg), std=0.08, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weights_proj.weight"):
                p.abs_()
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save(out)
    return out


def _prompt(n: int, seed: int = PROMPT_SEED) -> list[int]:
    return torch.randint(0, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _glm5_greedy(model, ids: list[int]) -> list[int]:
    return list(LLM(model).generate([ids], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
                .token_ids)


def _llama_teacher_forced(llm, ids: list[int], continuation: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy choice after the prompt and after each token of `continuation` (decoded one at a time,
    as generation does), and its logits at every position."""
    llm.reset()
    llm.eval(ids)
    for token in continuation:
        llm.eval([token])
    logits = np.array(llm.scores[: len(ids) + len(continuation)], dtype=np.float32)
    return [int(i) for i in logits[len(ids) - 1:].argmax(axis=-1)], logits


def _selection_gaps(model_dir, seq: list[int]) -> tuple[float, float]:
    """The smallest relative gap between the k-th and (k+1)-th choice of the indexer's top-k and of the router
    over a forward of `seq`: where one is below rounding, the selection itself is not defined by the arithmetic."""
    import glm5.model.indexer as dsa
    import glm5.model.moe as moe

    indexer_gaps, router_gaps = [1.0], [1.0]
    keep_ties, keep_router = dsa.lowest_position_ties, moe.Router.forward

    def tie_spy(scores, values, indices):
        k = values.shape[-1]
        if scores.shape[-1] > k:
            top = scores.topk(k + 1, dim=-1).values
            finite = torch.isfinite(top[..., k])
            scale = scores.masked_fill(~torch.isfinite(scores), 0).abs().amax(-1).clamp_min(1e-30)
            gap = ((top[..., k - 1] - top[..., k]) / scale)[finite]
            if gap.numel():
                indexer_gaps.append(float(gap.min()))
        return keep_ties(scores, values, indices)

    def router_spy(self, x):
        choice = torch.nn.functional.linear(x.float(), self.weight.float()).sigmoid() + self.e_score_correction_bias
        top = choice.topk(self.top_k + 1, dim=-1).values
        router_gaps.append(float((top[:, self.top_k - 1] - top[:, self.top_k]).min()))
        return keep_router(self, x)

    dsa.lowest_position_ties, moe.Router.forward = tie_spy, router_spy
    try:
        reference = GLM5ForCausalLM.from_pretrained(model_dir, attn_impl="reference").eval()
        with torch.no_grad():
            reference(torch.tensor([seq]))
    finally:
        dsa.lowest_position_ties, moe.Router.forward = keep_ties, keep_router
    return min(indexer_gaps), min(router_gaps)


def _check_parity(llama_path, model, ids, rtol, what):
    ours = _glm5_greedy(model, ids)
    theirs, logits = _llama_teacher_forced(_llama(llama_path), ids, ours)
    with torch.no_grad():
        reference = model(torch.tensor([ids + ours])).logits[0].numpy()
    assert theirs[:-1] == ours, (f"{what}: greedy tokens part at "
                                 f"{next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}")
    scale = float(np.abs(reference).max())
    diff = np.abs(logits - reference).max(axis=-1)
    worst = int(diff.argmax())
    assert diff[worst] <= rtol * scale, f"{what}: logits at position {worst} differ by {diff[worst]:.3g} (scale {scale:.3g})"
    return diff, scale


@pytest.mark.slow
@pytest.mark.parametrize("n_prompt", [40, 150])
def test_f32_gguf_runs_in_llama_cpp_to_the_same_tokens_and_logits(model_dir, tmp_path, n_prompt):
    """40 tokens: below index_topk (64), plain causal attention; 150: DSA's top-k selects in prefill and decode.
    Every position's logits (prompt, then 32 greedy tokens decoded one by one) within fp32 rounding."""
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    ids = _prompt(n_prompt)
    indexer_gap, router_gap = _selection_gaps(model_dir, ids + _glm5_greedy(model, ids))
    assert indexer_gap > MIN_SELECTION_GAP and router_gap > MIN_SELECTION_GAP, (
        f"the test's sequence has a near-tie (indexer {indexer_gap:.2g}, router {router_gap:.2g}): choose another seed")
    # fp32 on both sides, summed in other orders (llama.cpp also rotates the indexer's q and k by a Hadamard
    # matrix): ~1.5e-5 of the logits' scale measured; 1e-4 leaves room for other CPUs' kernels
    _check_parity(path, model, ids, 1e-4, "f32")


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)), in nats."""
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("out_type, kl_same, kl_original", [("q8_0", 0.1, 0.1), ("q4_k", 0.15, 0.6)])
def test_quantized_gguf_matches_glm5_on_the_same_weights(model_dir, tmp_path, out_type, kl_same, kl_original):
    """llama.cpp on a q8_0 / q4_k file against glm5 on that file's weights read back (dequantized). llama.cpp also
    rounds the activations to 8 bits (q8_0 blocks) before each quantized matmul, and on this random-weight model
    that rounding moves router and top-k choices at some positions, so the comparison is distributional: the mean
    KL over 150 positions. Measured here: q8_0 0.021 nats (median position 2.5% of the logits' scale), q4_k 0.043;
    a layout error (a transposed or misordered tensor) gives more than 1. And the file against the unquantized
    model within the format's own loss: q8_0 0.036, q4_k 0.31 nats (llama.cpp's own q4_k_m quantizer: 0.38)."""
    path = export_gguf(model_dir, tmp_path / "m.gguf", out_type=out_type)
    same_weights = load_gguf_model(path, model_dir)
    ids = _prompt(150)
    llm = _llama(path)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        on_file = same_weights(torch.tensor([ids])).logits[0].numpy()
        original = GLM5ForCausalLM.from_pretrained(model_dir).eval()(torch.tensor([ids])).logits[0].numpy()
    kl = _mean_kl(on_file, theirs)
    assert kl <= kl_same, f"{out_type}: llama.cpp and glm5 on the same weights differ by {kl:.3g} nats per position"
    loss = _mean_kl(original, on_file)
    assert loss <= kl_original, f"{out_type}: the file's weights lose {loss:.3g} nats per position"


def test_bench_peer_runs_the_exported_model_to_glm5s_tokens(model_dir, tmp_path):
    """The benchmarks' llama.cpp peer: the model in memory exported (with the default tokenizer) to f32, then
    greedy for 8 tokens on one sequence (llama.cpp's eval loop) and on two sequences of different lengths at once
    (one llama_batch per step), each equal to glm5's; a doctored mismatch is located and explained."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from llamacpp_peer import BatchedLlama, export_model, first_mismatch, open_llama, run_llama

    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    path = export_model(model, tmp_path)
    assert path == tmp_path / "model-f32.gguf" and (tmp_path / "model" / "tokenizer.json").is_file()
    prompts = [_prompt(40), _prompt(33, seed=PROMPT_SEED + 1)]
    ours = [list(o.token_ids) for o in LLM(model).generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
    for ids, tokens in zip(prompts, ours):  # below index_topk: no top-k; the router's cut checked clear of ties
        assert min(_selection_gaps(model_dir, ids + tokens)) > MIN_SELECTION_GAP
    llm = open_llama(path, n_ctx=64, n_batch=64, threads=1)
    try:
        first, total, tokens = run_llama(llm, prompts[0], 8)
        assert tokens == ours[0] and 0 < first <= total
        with BatchedLlama(path, n_seq=2, n_ctx_seq=64, n_batch=16, threads=1) as batched:  # prompts in 5 chunks
            for _ in range(2):  # the second run starts from a cleared cache
                first, total, rows = batched.run(prompts, 8)
                assert rows == ours and 0 < first <= total
        assert first_mismatch(model, llm, prompts[0], ours[0], ours[0]) is None
        other = int(np.argsort(llm.scores[len(prompts[0]) + 2])[-2])  # llama.cpp's runner-up after new token 3
        where = first_mismatch(model, llm, prompts[0], ours[0], ours[0][:3] + [other] + ours[0][4:])
    finally:
        llm.close()
    assert where["at"] == 3 and where["glm5_token"] == ours[0][3] and where["llamacpp_token"] == other
    # the doctored token is the runner-up on both sides: both gaps are of a real choice, llama.cpp's negative
    assert where["glm5_gap"] > 0 > where["llamacpp_gap"]
    assert where["largest_logit_diff"] <= 1e-4 * where["logit_scale"], where  # fp32 on both sides


def _strings() -> list[str]:
    base = ["", " ", "  leading", "trailing  ", "Hello, world!", "It's 12345678 o'clock; we'll see.", "tab\tand\nnewline\r\n",
            "naïve café — Ελληνικά, русский, 中文, 日本語, 한국어, emoji 🎉🚀", "def f(x):\n    return x ** 2  # square\n",
            "<|user|>hi<|assistant|><think>hm</think>ok", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo"
            "</arg_value></tool_call>", "[gMASK]<sop><|system|>\nsys", "   \n\n\t  ", "a" * 300, "0.5e-3 -12 +7 1,000,000"]
    words = " ".join(default_tokenizer().decode(list(range(256, 1200))).split()[:2000]).split(" ")
    rng = np.random.default_rng(0)
    for i in range(300):
        n = int(rng.integers(1, 30))
        picked = [words[j] for j in rng.integers(0, len(words), n)]
        if i % 5 == 0:
            picked.insert(int(rng.integers(0, n)), SPECIAL_TOKENS[int(rng.integers(0, len(SPECIAL_TOKENS)))])
        base.append((" " if i % 3 else "").join(picked))
    return base


def test_embedded_tokenizer_gives_llama_cpp_the_same_ids(model_dir, tmp_path):
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = default_tokenizer()
    strings = _strings()
    assert len(strings) >= 300
    for text in strings:
        for special in (False, True):
            ours = tok.encode(text, allow_special=special)
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
            assert theirs == ours, f"special={special} {text!r}: llama.cpp {theirs[:20]} vs glm5 {ours[:20]}"
        ids = tok.encode(text, allow_special=True)
        assert llm.detokenize(ids, special=True).decode("utf-8", errors="replace") == tok.decode(ids), text


def _converter_source() -> Path | None:
    """llama.cpp's own convert_hf_to_gguf.py, from the llama-cpp-python source archive `make llama-cpp` keeps."""
    root = Path(os.environ.get("GLM5_CACHE", Path.home() / ".cache" / "glm5")) / "llama-cpp"
    archives = sorted(glob.glob(str(root / "*" / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz")))
    if not archives:
        return None
    out = root / f"source-{llama_cpp.__version__}"
    if not (out / "convert_hf_to_gguf.py").exists():
        prefix = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                       (m.name.startswith(prefix + "conversion/") or m.name.startswith(prefix + "gguf-py/")
                        or m.name == prefix + "convert_hf_to_gguf.py")]
            for m in members:
                m.name = m.name[len(prefix):]
            tmp = out.with_suffix(".tmp")
            tar.extractall(tmp, members=members, filter="data")
            os.replace(tmp, out)
    return out


@pytest.mark.slow
def test_llama_cpp_converter_output_agrees(model_dir, tmp_path):
    """llama.cpp's converter reads our save_pretrained output; told the pre-tokenizer (its hash of our BPE is
    unknown to it), its file runs to the same greedy tokens as ours and as glm5."""
    source = _converter_source()
    if source is None:
        pytest.skip("llama-cpp-python's source archive is not in the cache (make llama-cpp keeps it)")
    out = tmp_path / "theirs.gguf"
    # the converter recognizes tokenizers by a hash of their output; ours is new to it, so name the pre-tokenizer
    script = ("import sys, runpy; sys.argv = ['convert_hf_to_gguf.py', sys.argv[1], '--outfile', sys.argv[2], "
              "'--outtype', 'f32']; import conversion.base as b; "
              "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'dbrx'; "
              "runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{source / 'gguf-py'}", "NO_LOCAL_GGUF": ""}
    done = subprocess.run([sys.executable, "-c", script, str(model_dir), str(out)], cwd=source, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    _check_parity(out, model, _prompt(150), 1e-4, "llama.cpp's converter")
