/* The routed experts of a MoE layer on a few rows (decode steps), for CPUs: glm5.kernels.experts' fast path.
 *
 * At decode sizes the experts are bound by reading their weights: each selected expert's gate_up [2I, H] and
 * down [H, I] should stream through the cores once per step whatever the number of rows that picked it.
 * PyTorch's static forms either read every expert (dense_all: all E experts on all rows, E / k times the
 * FLOPs) or one weight copy per (row, expert) pair (gathered). Here each expert with at least one pair reads
 * its weights once and applies them to all its pairs, a block of up to RB rows at a time.
 *
 * A job is a slice [i0, i1) of the intermediate dimension: it computes gate and up for its slice, SiLU(gate) *
 * up, and the slice's share of down's product, written to its own partial [N k, H]; `experts_rows_combine`
 * sums the jobs' partials and the k slots of each row with the router's weights, in a fixed order. fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define RB 4 /* rows per block: 2 RB accumulators for gate / up, RB for down */

/* g[r] = <wg, x_r>, u[r] = <wu, x_r> over H for R rows (R a constant after inlining) */
static inline __attribute__((always_inline)) void gate_up_dots(const float *wg, const float *wu,
                                                              const float *const *xr, const int R, int64_t H,
                                                              float *g, float *u) {
    vf ag[RB], au[RB];
    for (int r = 0; r < R; r++) ag[r] = au[r] = (vf){0};
    const int64_t hv = H / VL * VL;
    int64_t h = 0;
    for (; h < hv; h += VL) {
        const vf a = *(const vf *)(wg + h), b = *(const vf *)(wu + h);
        for (int r = 0; r < R; r++) {
            const vf xv = *(const vf *)(xr[r] + h);
            ag[r] += a * xv;
            au[r] += b * xv;
        }
    }
    for (int r = 0; r < R; r++) {
        float sg = hsum(ag[r]), su = hsum(au[r]);
        for (int64_t t = h; t < H; t++) {
            sg += wg[t] * xr[r][t];
            su += wu[t] * xr[r][t];
        }
        g[r] = sg;
        u[r] = su;
    }
}

/* one expert on R (<= RB) pairs, intermediate slice [i0, i1): partial[pair] = down[:, i0:i1] act[i0:i1] */
static inline __attribute__((always_inline)) void expert_block(const float *gu, const float *dn,
                                                              const float *const *xr, const int64_t *pairs,
                                                              const int R, int64_t H, int64_t I, int64_t i0,
                                                              int64_t i1, float *gbuf, float *ubuf,
                                                              float *partial) {
    const int64_t L = i1 - i0;
    float g[RB], u[RB], y[RB];
    for (int64_t i = i0; i < i1; i++) {
        gate_up_dots(gu + i * H, gu + (I + i) * H, xr, R, H, g, u);
        for (int r = 0; r < R; r++) {
            gbuf[r * L + (i - i0)] = g[r];
            ubuf[r * L + (i - i0)] = u[r];
        }
    }
    for (int r = 0; r < R; r++) { /* act = SiLU(g) * u, in gbuf */
        float *gr = gbuf + r * L, *ur = ubuf + r * L;
        const int64_t lv = L / VL * VL;
        int64_t l = 0;
        for (; l < lv; l += VL) {
            const vf gv = *(const vf *)(gr + l);
            *(vf *)(gr + l) = gv * vsigmoid(gv) * *(const vf *)(ur + l);
        }
        for (; l < L; l++) gr[l] = gr[l] * sigmoid1(gr[l]) * ur[l];
    }
    for (int64_t o = 0; o < H; o++) {
        dot_rows(dn + o * I + i0, L, gbuf, L, R, y, 1);
        for (int r = 0; r < R; r++) partial[pairs[r] * H + o] = y[r];
    }
}

/* x [N, H]; idx [N k] (each row's k experts); gate_up [E, 2I, H]; down [E, H, I]; partial [N k, H] (this job's
 * slice [i0, i1) of I). Returns 0, or -1 when scratch memory could not be had. */
int glm5_experts_rows(const float *x, const int64_t *idx, int64_t N, int64_t K, const float *gate_up,
                      const float *down, int64_t E, int64_t H, int64_t I, int64_t i0, int64_t i1, float *partial) {
    const int64_t L = i1 - i0, P = N * K;
    if (L <= 0) return 0;
    float *buf = malloc(sizeof(float) * 2 * RB * L);
    int64_t *pairs = malloc(sizeof(int64_t) * (P > 0 ? P : 1));
    if (!buf || !pairs) {
        free(buf);
        free(pairs);
        return -1;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t p = 0; p < P; p++)
            if (idx[p] == e) pairs[n++] = p;
        const float *gu = gate_up + e * 2 * I * H, *dn = down + e * H * I;
        for (int64_t b = 0; b < n; b += RB) {
            const float *xr[RB];
            const int R = (int)(n - b < RB ? n - b : RB);
            for (int r = 0; r < R; r++) xr[r] = x + (pairs[b + r] / K) * H;
            switch (R) { /* constant R: the accumulators stay in registers */
            case 1: expert_block(gu, dn, xr, pairs + b, 1, H, I, i0, i1, buf, buf + RB * L, partial); break;
            case 2: expert_block(gu, dn, xr, pairs + b, 2, H, I, i0, i1, buf, buf + RB * L, partial); break;
            case 3: expert_block(gu, dn, xr, pairs + b, 3, H, I, i0, i1, buf, buf + RB * L, partial); break;
            default: expert_block(gu, dn, xr, pairs + b, 4, H, I, i0, i1, buf, buf + RB * L, partial); break;
            }
        }
    }
    free(buf);
    free(pairs);
    return 0;
}

/* out[n] = sum_s w[n, s] (sum_j partials[j][n k + s]) for rows [n0, n1): jobs in order, then slots in order */
void glm5_experts_rows_combine(const float *const *partials, int64_t jobs, const float *w, int64_t K, int64_t H,
                               int64_t n0, int64_t n1, float *out) {
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * H;
        memset(o, 0, sizeof(float) * H);
        for (int64_t s = 0; s < K; s++) {
            const float ws = w[n * K + s];
            const int64_t p = n * K + s;
            for (int64_t h = 0; h < H; h++) {
                float y = 0.0f;
                for (int64_t j = 0; j < jobs; j++) y += partials[j][p * H + h];
                o[h] += ws * y;
            }
        }
    }
}

int glm5_experts_rows_jobs(const float *x, const int64_t *idx, int64_t N, int64_t K, const float *gate_up,
                           const float *down, int64_t E, int64_t H, int64_t I, const int64_t *bounds, int64_t jobs,
                           float *const *partials) {
    int failed = 0;
#pragma omp parallel for num_threads(jobs) schedule(static, 1) reduction(| : failed)
    for (int64_t j = 0; j < jobs; j++)
        failed |= glm5_experts_rows(x, idx, N, K, gate_up, down, E, H, I, bounds[j], bounds[j + 1], partials[j]) != 0;
    return failed ? -1 : 0;
}
