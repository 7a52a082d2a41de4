/* The DSA lightning indexer fused with its top-k, for CPUs: glm5.kernels.indexer_topk's fast path.
 *
 * For each query i (position pos[i]) of one sequence:
 *     I[i, s] = sum_h w[i, h] * relu(q[i, h] . k[s])        for every visible key s <= pos[i]
 * and out[i] = the positions of the topk largest I[i, s] (unsorted; -1 fills slots when fewer keys are visible).
 *
 * Why a kernel: in PyTorch the [queries * heads, keys] dot products are one matmul, but the relu and the
 * head-weighted sum then make three more passes over a tensor heads times larger than the scores, and
 * top-k is a generic sort-based routine: together ~6x the matmul's own time at 8K tokens. Here a tile of
 * 64 keys x 4 heads stays in registers from the dot products to the weighted sum, and top-k is a
 * threshold scan (almost every score is below the running k-th largest and costs one compare).
 *
 * Portable C with GCC/Clang vector extensions at the width of the CPU's registers (vec.h: 16 floats with
 * AVX-512, 8 with AVX2, 4 with NEON / SSE2); fp32 throughout, no -ffast-math, so the scores match torch's to rounding.
 * Threads: the caller runs disjoint sets of query blocks on its own threads (block_begin, block_step).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define KTILE 64              /* keys per tile (the layout glm5.kernels.indexer builds) */
/* NR: accumulator vectors per head in one pass, so 4 heads x NR accumulators stay in registers. 8 in all on
 * x86 (AVX-512 zmm, AVX2 ymm, SSE2 xmm): two FMA pipes of latency 4 stay busy, and GCC keeps them in
 * registers (with 16 zmm accumulators it spilled inside the loop: 25% slower on AVX-512, and 4 zmm were
 * faster still on a Zen 4, whose 512-bit FMAs are two 256-bit halves); 16 of AArch64's 32 NEON registers. */
#ifndef NR
#if defined(__aarch64__)
#define NR 4
#else
#define NR 2
#endif
#endif
#define SUB (NR * VL)         /* keys per pass over a tile: 32 with AVX-512, 16 with AVX2 / NEON, 8 with SSE2 */
#define QBLOCK 16             /* queries per block: their score rows (16 x T floats) stay in L2 */

/* 4 heads of one query against the 64 keys of one tile (tile [D, 64]: key s0 + j's dim d at d * 64 + j):
 * row[s0 .. s0 + 64) (+)= sum_h w_h relu(q_h . k_s), SUB keys at a time so that the 4 x NR accumulators
 * stay in registers */
static inline void tile_4heads(const float *q, const float *w, const float *tile, int64_t D, int64_t s0,
                               float *row, int first) {
    for (int j0 = 0; j0 < KTILE; j0 += SUB) {
        vf a0[NR] = {{0}}, a1[NR] = {{0}}, a2[NR] = {{0}}, a3[NR] = {{0}};
        for (int64_t d = 0; d < D; d++) {
            const float *kp = tile + d * KTILE + j0;
            const float q0 = q[d], q1 = q[D + d], q2 = q[2 * D + d], q3 = q[3 * D + d];
            for (int j = 0; j < NR; j++) {
                const vf k = *(const vf *)(kp + j * VL);
                a0[j] += q0 * k;
                a1[j] += q1 * k;
                a2[j] += q2 * k;
                a3[j] += q3 * k;
            }
        }
        for (int j = 0; j < NR; j++) {
            vf s = w[0] * relu(a0[j]) + w[1] * relu(a1[j]) + w[2] * relu(a2[j]) + w[3] * relu(a3[j]);
            vf *out = (vf *)(row + s0 + j0 + j * VL);
            *out = first ? s : *out + s;
        }
    }
}

static inline void tile_1head(const float *q, float w, const float *tile, int64_t D, int64_t s0, float *row,
                              int first) {
    for (int j0 = 0; j0 < KTILE; j0 += SUB) {
        vf a[NR] = {{0}};
        for (int64_t d = 0; d < D; d++) {
            const float *kp = tile + d * KTILE + j0;
            for (int j = 0; j < NR; j++) a[j] += q[d] * *(const vf *)(kp + j * VL);
        }
        for (int j = 0; j < NR; j++) {
            vf s = w * relu(a[j]);
            vf *out = (vf *)(row + s0 + j0 + j * VL);
            *out = first ? s : *out + s;
        }
    }
}

/* The k-th largest of v[0..n) (1 <= k <= n, no NaN), by bisection on the floats' bits: map each float to an
 * int32 with the same order, then find the largest t with #{key >= t} >= k, which is exactly the k-th
 * largest key. 32 rounds of n / 16 vector compares: no data-dependent branch, unlike a quickselect, whose
 * mispredicted comparisons cost ~4x more on these 64-512 values. keys: room for n + VL ints. */
static float kth_largest(const float *v, int64_t n, int64_t k, int32_t *keys) {
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int64_t j = 0; j < n; j++) {
        int32_t bits;
        memcpy(&bits, v + j, sizeof bits);
        const int32_t key = bits ^ ((bits >> 31) & INT32_MAX);   /* negative floats: flip to ascending order */
        keys[j] = key;
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
    }
    const int64_t nv = (n + VL - 1) / VL;
    for (int64_t j = n; j < nv * VL; j++) keys[j] = INT32_MIN;  /* never >= t: t > lo >= INT32_MIN below */
    /* invariant: #{key >= lo} >= k, #{key >= hi + 1} < k */
    int64_t low = lo, high = (int64_t)hi + 1;
    while (high - low > 1) {
        const int64_t mid = low + (high - low) / 2;
        const vi t = (vi){0} + (int32_t)mid;
        vi acc = {0};
        for (int64_t j = 0; j < nv; j++) acc += *(const vi *)(keys + j * VL) >= t;   /* true is -1 */
        int32_t lanes[VL];
        memcpy(lanes, &acc, sizeof lanes);
        int32_t count = 0;
        for (int l = 0; l < VL; l++) count -= lanes[l];
        if (count >= k) low = mid;
        else high = mid;
    }
    const int32_t key = (int32_t)low;
    const int32_t bits = key ^ ((key >> 31) & INT32_MAX);
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Append every s in [0, len) with row[s] >= bound to cv / ci (which have VL slots of slack past len). */
#if defined(__AVX512F__)
/* AVX-512: compare 16 scores, compress the passing ones (and their positions) to the front of a register,
 * store all 16 lanes; the count advances by the number that passed. No branch per key. */
static int64_t collect_at_least(const float *row, int64_t len, float bound, float *cv, int64_t *ci, int64_t count) {
    const __m512 b = _mm512_set1_ps(bound);
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    int64_t s = 0;
    for (; s + VL <= len; s += VL) {
        const __m512 r = _mm512_loadu_ps(row + s);
        const __mmask16 k = _mm512_cmp_ps_mask(r, b, _CMP_GE_OQ);
        if (!k) continue;
        _mm512_storeu_ps(cv + count, _mm512_maskz_compress_ps(k, r));
        const __m512i lo = _mm512_add_epi64(_mm512_set1_epi64(s), iota);
        const int n_lo = __builtin_popcount(k & 0xff);
        _mm512_storeu_si512((void *)(ci + count), _mm512_maskz_compress_epi64((__mmask8)k, lo));
        _mm512_storeu_si512((void *)(ci + count + n_lo),
                            _mm512_maskz_compress_epi64((__mmask8)(k >> 8), _mm512_add_epi64(lo, _mm512_set1_epi64(8))));
        count += __builtin_popcount(k);
    }
    for (; s < len; s++)
        if (row[s] >= bound) { cv[count] = row[s]; ci[count++] = s; }
    return count;
}
#else
/* Other instruction sets: 64 keys at a time, a tile with no such key costs a few vector compares; otherwise
 * branch-free (the hits are too scattered to predict). */
static int64_t collect_at_least(const float *row, int64_t len, float bound, float *cv, int64_t *ci, int64_t count) {
    const vf b = (vf){0} + bound;
    int64_t s = 0;
    for (; s + KTILE <= len; s += KTILE) {
        const vf *r = (const vf *)(row + s);
        vi any = r[0] >= b;
        for (int j = 1; j < KTILE / VL; j++) any |= r[j] >= b;
        if (!any_lane(any)) continue;
        for (int64_t j = s; j < s + KTILE; j++) {
            cv[count] = row[j];
            ci[count] = j;
            count += row[j] >= bound;
        }
    }
    for (; s < len; s++)
        if (row[s] >= bound) { cv[count] = row[s]; ci[count++] = s; }
    return count;
}
#endif

/* out[0..topk) = positions of the topk largest of row[0..len) among keys with mask[s] != 0 (mask may be
 * NULL); -1 in the slots left when fewer are visible. cv / ci / keys: room for len + 16 candidates; maxima: room
 * for max_groups(topk) floats.
 *
 * Unmasked rows longer than 2 topk: split the row into G interleaved groups (s mod G; topk <= G <= 4 topk,
 * at least 2 keys per group) and take each group's maximum (vector maxima over the row). The topk-th
 * largest maximum m is a lower bound for the topk-th largest score (the topk groups it ranks include topk
 * scores >= m), so the answer is among the scores >= m: typically 1-2 topk of them. One vectorized pass, a
 * selection over G maxima, a second vectorized pass, a selection over the few candidates. */
static int64_t max_groups(int64_t topk) { return (4 * topk + VL - 1) / VL * VL; }

static void select_row(const float *row, const uint8_t *mask, int64_t len, int64_t topk, float *cv,
                       int64_t *ci, int32_t *keys, float *maxima, int64_t *out) {
    int64_t count = 0;
    int64_t G = len / 2 / VL * VL;
    G = G < max_groups(topk) ? G : max_groups(topk);
    if (!mask && G >= topk) {
        vf *m = (vf *)maxima;
        const int64_t nv = G / VL;
        memcpy(maxima, row, sizeof(float) * G);
        int64_t s = G;
        for (; s + G <= len; s += G) {
            const vf *r = (const vf *)(row + s);
            for (int64_t j = 0; j < nv; j++) {
                const vf x = r[j], y = m[j];
                const vi gt = x > y;
                m[j] = (vf)(((vi)x & gt) | ((vi)y & ~gt));
            }
        }
        for (int64_t j = 0; s < len; s++, j++) maxima[j] = row[s] > maxima[j] ? row[s] : maxima[j];
        const float bound = kth_largest(maxima, G, topk, keys);
        count = collect_at_least(row, len, bound, cv, ci, 0);
    } else {
        for (int64_t s = 0; s < len; s++)
            if (!mask || mask[s]) { cv[count] = row[s]; ci[count++] = s; }
    }
    if (count <= topk) {
        for (int64_t j = 0; j < count; j++) out[j] = ci[j];
        for (int64_t j = count; j < topk; j++) out[j] = -1;
        return;
    }
    /* the topk-th largest candidate, then every candidate above it and as many equal to it as fit */
    const float kth = kth_largest(cv, count, topk, keys);
    int64_t n = 0;
    for (int64_t j = 0; j < count; j++)
        if (cv[j] > kth) out[n++] = ci[j];
    for (int64_t j = 0; j < count && n < topk; j++)
        if (cv[j] == kth) out[n++] = ci[j];
    for (; n < topk; n++) out[n] = -1;   /* a NaN k-th score matches neither test: never leave a slot unwritten */
}

/* q [S, H, D], w [S, H] (all scales folded in), kT [Tp / 64, D, 64] (keys in tiles of 64, each tile
 * transposed so its 16 KB (D = 64) are contiguous: a strided [D, Tp] layout puts a tile's rows 4 KB-aligned
 * apart, in the same few L1 sets; zero-padded to Tp, a multiple of 64, Tp >= T), pos [S], key_mask [T] or
 * NULL, out [S, topk]. Runs query blocks block_begin,
 * block_begin + block_step, ... Returns 0, or -1 when memory ran out. */
int glm5_indexer_topk(const float *q, const float *w, const float *kT, const int64_t *pos, const uint8_t *key_mask,
                      int64_t S, int64_t H, int64_t D, int64_t T, int64_t Tp, int64_t topk, int64_t block_begin,
                      int64_t block_step, int64_t *out) {
    float *rows = (float *)malloc(sizeof(float) * QBLOCK * Tp);
    float *cv = (float *)malloc(sizeof(float) * (Tp + VL));
    int64_t *ci = (int64_t *)malloc(sizeof(int64_t) * (Tp + VL));
    int32_t *keys = (int32_t *)malloc(sizeof(int32_t) * (Tp + VL));
    float *maxima = (float *)malloc(sizeof(float) * max_groups(topk));
    if (!rows || !cv || !ci || !keys || !maxima) {
        free(rows); free(cv); free(ci); free(keys); free(maxima);
        return -1;
    }
    const int64_t blocks = (S + QBLOCK - 1) / QBLOCK;
    for (int64_t b = block_begin; b < blocks; b += block_step) {
        const int64_t i0 = b * QBLOCK, i1 = (i0 + QBLOCK < S) ? i0 + QBLOCK : S;
        int64_t last[QBLOCK];   /* each query's last visible key, -1 when none */
        int64_t block_last = -1;
        for (int64_t i = i0; i < i1; i++) {
            int64_t p = pos[i] < T ? pos[i] : T - 1;
            last[i - i0] = p;
            block_last = p > block_last ? p : block_last;
        }
        /* tiles outermost: a tile of keys (D x 64 floats) stays in L1 while every query of the block reads it */
        for (int64_t s0 = 0; s0 <= block_last; s0 += KTILE) {
            for (int64_t i = i0; i < i1; i++) {
                if (s0 > last[i - i0]) continue;
                float *row = rows + (i - i0) * Tp;
                const float *qi = q + i * H * D, *wi = w + i * H;
                const float *tile = kT + s0 * D;
                int64_t h = 0;
                for (; h + 4 <= H; h += 4) tile_4heads(qi + h * D, wi + h, tile, D, s0, row, h == 0);
                for (; h < H; h++) tile_1head(qi + h * D, wi[h], tile, D, s0, row, h == 0);
            }
        }
        for (int64_t i = i0; i < i1; i++)
            select_row(rows + (i - i0) * Tp, key_mask, last[i - i0] + 1, topk, cv, ci, keys, maxima, out + i * topk);
    }
    free(rows); free(cv); free(ci); free(keys); free(maxima);
    return 0;
}

/* glm5_indexer_topk over query blocks t, t + jobs, t + 2 jobs, ... for t < jobs, one job per thread */
int glm5_indexer_topk_jobs(const float *q, const float *w, const float *kT, const int64_t *pos, const uint8_t *key_mask,
                           int64_t S, int64_t H, int64_t D, int64_t T, int64_t Tp, int64_t topk, int64_t jobs,
                           int64_t *out) {
    int rc = 0;
#pragma omp parallel for num_threads(jobs) schedule(static, 1) reduction(| : rc)
    for (int64_t t = 0; t < jobs; t++) rc |= glm5_indexer_topk(q, w, kT, pos, key_mask, S, H, D, T, Tp, topk, t, jobs, out);
    return rc;
}
