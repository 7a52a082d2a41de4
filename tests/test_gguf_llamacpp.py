"""llama.cpp runs glm5's GGUF export and computes what glm5 computes (llama-cpp-python as the oracle).

- f32: a demo-sized model, prompts longer than index_topk (DSA's top-k active in prefill and decode): greedy
  tokens identical for 32 new tokens and last-position logits within fp32 rounding of their scale.
- q8_0 / q4_k: llama.cpp on the quantized file against glm5 on the same file read back (dequantized), with
  the tolerance of llama.cpp's own activation rounding (it multiplies q8_0-quantized activations by the
  quantized weights), and against the unquantized model with the format's own.
- text: the embedded tokenizer gives llama.cpp the ids glm5.tokenizer gives, special tokens included.
- llama.cpp's own converter (vendored in llama-cpp-python's source archive) on our save_pretrained output
  writes a file that llama.cpp runs to the same tokens.

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

from glm5 import GLM5Config, GLM5ForCausalLM  # noqa: E402
from glm5.quant.gguf import export_gguf, load_gguf_model  # noqa: E402
from glm5.tokenizer import SPECIAL_TOKENS, default_tokenizer  # noqa: E402

from .conftest import randomize_  # noqa: E402

NEW_TOKENS = 32
GGML_TYPE_F32 = 0


def _llama(path, **kw):
    # the K/V caches (latent and indexer keys) in f32, like glm5's: llama.cpp's default f16 cache rounds the
    # latents to 11 bits, which moves DSA's top-k choice where two scores are close
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
                           verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A demo-sized model (the nano preset) with weights large enough that every path matters."""
    tok = default_tokenizer()
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size, index_head_dim=64)
    model = randomize_(GLM5ForCausalLM(cfg), std=0.08, seed=3)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save(out)
    return out


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _glm5_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    seq, out, first = list(ids), [], None
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([seq])).logits[0, -1]
        first = logits if first is None else first
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out, first


def _llama_greedy(llm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, first


def _compare(path, model, n_prompt: int, seed: int, atol_scale: float):
    llm = _llama(path)
    ids = _prompt(n_prompt, seed)
    ours, ours_logits = _glm5_greedy(model, ids)
    theirs, theirs_logits = _llama_greedy(llm, ids)
    scale = float(ours_logits.abs().max())
    diff = float(np.abs(theirs_logits - ours_logits.numpy()).max())
    return ours, theirs, diff, scale


@pytest.mark.slow
@pytest.mark.parametrize("n_prompt", [40, 150])
def test_f32_gguf_runs_in_llama_cpp_to_the_same_tokens(model_dir, tmp_path, n_prompt):
    """40 tokens: below index_topk (64), plain causal attention; 150: DSA's top-k selects in prefill and decode."""
    path = export_gguf(model_dir, tmp_path / "m.gguf")
    model = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    ours, theirs, diff, scale = _compare(path, model, n_prompt, seed=n_prompt, atol_scale=1e-4)
    assert theirs == ours, f"greedy tokens part at {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"
    # fp32 both sides; llama.cpp sums in other orders (and rotates the indexer by a Hadamard matrix): ~1e-6 relative
    assert diff <= 1e-4 * max(scale, 1.0), f"last-position logits differ by {diff:.3g} (scale {scale:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("out_type, rtol_file, rtol_original", [("q8_0", 2e-2, 5e-2), ("q4_k", 2e-2, 0.5)])
def test_quantized_gguf_matches_glm5_on_the_same_weights(model_dir, tmp_path, out_type, rtol_file, rtol_original):
    path = export_gguf(model_dir, tmp_path / "m.gguf", out_type=out_type)
    same_weights = load_gguf_model(path, model_dir)
    ids = _prompt(150, 7)
    llm = _llama(path)
    theirs, theirs_logits = _llama_greedy(llm, ids)
    ours, ours_logits = _glm5_greedy(same_weights, ids)
    scale = float(ours_logits.abs().max())
    diff = float(np.abs(theirs_logits - ours_logits.numpy()).max())
    # llama.cpp quantizes activations to q8_0 for q8_0 / k-quant matmuls: ~0.4% per product, summed over layers
    assert diff <= rtol_file * scale, f"{out_type}: logits differ by {diff:.3g} (scale {scale:.3g}) on the same weights"
    original = GLM5ForCausalLM.from_pretrained(model_dir).eval()
    _, original_logits = _glm5_greedy(original, ids)
    drift = float((original_logits - ours_logits).abs().max())
    assert drift <= rtol_original * scale, f"{out_type}: quantization moved the logits by {drift:.3g}"


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
    ours_path = export_gguf(model_dir, tmp_path / "ours.gguf")
    ids = _prompt(150, 11)
    theirs, theirs_logits = _llama_greedy(_llama(out), ids)
    ours, ours_logits = _llama_greedy(_llama(ours_path), ids)
    assert theirs == ours
    np.testing.assert_allclose(theirs_logits, ours_logits, rtol=0, atol=1e-5 * float(np.abs(ours_logits).max()))
