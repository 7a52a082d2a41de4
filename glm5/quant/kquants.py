"""llama.cpp's Q4_K and Q2_K block formats, quantized in numpy (the `gguf` package only dequantizes them).

    from glm5.quant.kquants import quantize_q4_k, quantize_q2_k
    blocks = quantize_q4_k(w)          # w [..., n] fp32 with n % 256 == 0 -> uint8 [..., n // 256 * 144]

Both group a row into super-blocks of 256 weights (ggml's QK_K) and store per super-block an fp16 scale `d`
for the sub-block scales and an fp16 `dmin` for the sub-block minimums; a weight is `d * sc * q - dmin * m`.
- Q4_K: 8 sub-blocks of 32, 6-bit sc and m (packed into 12 bytes), 4-bit q; 144 bytes per 256 (4.5 bits).
- Q2_K: 16 sub-blocks of 16, 4-bit sc and m (one byte each), 2-bit q; 84 bytes per 256 (2.625 bits).
The byte layouts follow ggml's `block_q4_K` / `block_q2_K` (ggml-common.h) so that llama.cpp and gguf-py
dequantize them; the tests check that round trip. Scales come from each sub-block's min and max (no
iterative search as in ggml's reference quantizer), so the error is a little above llama.cpp's own.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _super_blocks(w: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape[-1] % QK_K:
        raise ValueError(f"K-quant rows must be a multiple of {QK_K} long, got {w.shape[-1]}")
    return w.reshape(-1, QK_K), w.shape


def _sub_block_affine(x: np.ndarray, levels: int, scale_bits: int):
    """x [B, S, n]: per sub-block scale and min quantized against per-super-block fp16 d and dmin.

    Returns (sc, m, d, dmin, q): sc/m [B, S] ints < 2**scale_bits, d/dmin [B] fp16, q [B, S, n] in [0, levels].
    """
    top = (1 << scale_bits) - 1
    lo = np.minimum(x.min(axis=-1), 0.0)          # the minimum is stored as a non-negative offset
    hi = x.max(axis=-1)
    scale = (hi - lo) / levels                      # [B, S]
    minimum = -lo
    d = (scale.max(axis=-1) / top).astype(np.float16)
    dmin = (minimum.max(axis=-1) / top).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, top).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(minimum / dmin32), 0).clip(0, top).astype(np.uint8)
        step = (d32 * sc)[..., None]
        offset = (dmin32 * m)[..., None]
        q = np.where(step > 0, np.rint((x + offset) / step), 0).clip(0, levels).astype(np.uint8)
    return sc, m, d, dmin, q


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """fp32 [..., n] -> ggml Q4_K blocks, uint8 [..., n // 256 * 144]."""
    x, shape = _super_blocks(w)
    sc, m, d, dmin, q = _sub_block_affine(x.reshape(-1, 8, 32), levels=15, scale_bits=6)
    scales = np.zeros((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    # 32 bytes per pair of sub-blocks: the low nibble holds the first sub-block, the high nibble the second
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q2_k(w: np.ndarray) -> np.ndarray:
    """fp32 [..., n] -> ggml Q2_K blocks, uint8 [..., n // 256 * 84]."""
    x, shape = _super_blocks(w)
    sc, m, d, dmin, q = _sub_block_affine(x.reshape(-1, 16, 16), levels=3, scale_bits=4)
    scales = (sc | (m << 4)).astype(np.uint8)
    # per 128 weights, 32 bytes; byte l holds weight l of sub-blocks 0, 2, 4, 6 (bits 0-1, 2-3, 4-5, 6-7) for
    # l < 16 and of sub-blocks 1, 3, 5, 7 for l >= 16: value j * 32 + l sits at bits 2j of byte l
    chunks = q.reshape(-1, 2, 4, 32)                 # [B, half, j, 32]
    qs = np.zeros((x.shape[0], 2, 32), dtype=np.uint8)
    for j in range(4):
        qs |= chunks[:, :, j] << (2 * j)
    out = np.concatenate([scales, qs.reshape(-1, 64), d[:, None].view(np.uint8), dmin[:, None].view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 84)
