/* A linear layer on a few rows (decode and speculative verify steps), for CPUs: glm5.kernels.linear's fast path.
 *
 * y [N, O] = x [N, H] W^T with W [O, H] row-major (nn.Linear's layout), N small. At these sizes a linear is
 * bound by reading W, and BLAS's GEMM for 2-3 rows reads it at a fraction of the GEMV's speed (on one AMD
 * EPYC, [3, 256] x [256, 4096]: 400 us against 105 us for one row, the weights hot in L3). Here each block of
 * OB output rows of W is read once for all N rows: a block of up to RB input rows at a time (the OB rows of W,
 * OB * H floats, stay in L1 between row blocks), OB * RB vector accumulators, reduced with hsum4.
 *
 * A job is a slice [o0, o1) of the outputs (multiples of OB but the last); fp32; no bias.
 */
#include <stdint.h>

#include "vec.h"

#define OB 4                   /* outputs per block: one hsum4 per row gives their four sums */
#define RB (REGS >= 32 ? 4 : 2) /* rows per block: OB * RB accumulators + OB weight vectors + x in registers */

/* y[r * ldy + o .. o + OB) for R (<= RB) rows: the four outputs o .. o + 3 */
static inline __attribute__((always_inline)) void block4(const float *w, int64_t H, const float *x, int64_t ldx,
                                                        const int R, float *y, int64_t ldy) {
    vf acc[OB][RB];
    for (int j = 0; j < OB; j++)
        for (int r = 0; r < R; r++) acc[j][r] = (vf){0};
    const float *w0 = w, *w1 = w + H, *w2 = w + 2 * H, *w3 = w + 3 * H;
    const int64_t hv = H / VL * VL;
    int64_t h = 0;
    for (; h < hv; h += VL) {
        const vf a0 = *(const vf *)(w0 + h), a1 = *(const vf *)(w1 + h), a2 = *(const vf *)(w2 + h),
                 a3 = *(const vf *)(w3 + h);
        for (int r = 0; r < R; r++) {
            const vf xv = *(const vf *)(x + r * ldx + h);
            acc[0][r] += a0 * xv;
            acc[1][r] += a1 * xv;
            acc[2][r] += a2 * xv;
            acc[3][r] += a3 * xv;
        }
    }
    for (int r = 0; r < R; r++) {
        float s[OB];
        hsum4(acc[0][r], acc[1][r], acc[2][r], acc[3][r], s);
        for (int64_t t = h; t < H; t++) {
            const float xt = x[r * ldx + t];
            s[0] += w0[t] * xt;
            s[1] += w1[t] * xt;
            s[2] += w2[t] * xt;
            s[3] += w3[t] * xt;
        }
        for (int j = 0; j < OB; j++) y[r * ldy + j] = s[j];
    }
}

#define ROWS_SWITCH(R, call_R)                                                                                   \
    switch (R) { /* a constant row count: the accumulators stay in registers */                              \
    case 1: call_R(1); break;                                                                                \
    case 2: call_R(2); break;                                                                                \
    case 3: call_R(RB >= 3 ? 3 : 2); break;                                                                  \
    default: call_R(RB); break;                                                                              \
    }

/* x [N, H] (rows ldx apart), w [O, H], y [N, O]: outputs [o0, o1) of every row */
void glm5_linear_rows(const float *x, int64_t N, int64_t ldx, const float *w, int64_t O, int64_t H, int64_t o0,
                      int64_t o1, float *y) {
    int64_t o = o0;
    for (; o + OB <= o1; o += OB)
        for (int64_t r0 = 0; r0 < N; r0 += RB) {
            const int R = (int)(N - r0 < RB ? N - r0 : RB);
#define CALL4(K) block4(w + o * H, H, x + r0 * ldx, ldx, K, y + r0 * O + o, O)
            ROWS_SWITCH(R, CALL4)
#undef CALL4
        }
    for (; o < o1; o++)
        for (int64_t r0 = 0; r0 < N; r0 += RB) {
            const int R = (int)(N - r0 < RB ? N - r0 : RB);
#define CALL1(K) dot_rows(w + o * H, H, x + r0 * ldx, ldx, K, y + r0 * O + o, O) /* the last O % OB */
            ROWS_SWITCH(R, CALL1)
#undef CALL1
        }
}

void glm5_linear_rows_jobs(const float *x, int64_t N, int64_t ldx, const float *w, int64_t O, int64_t H,
                           const int64_t *bounds, int64_t jobs, float *y) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++) glm5_linear_rows(x, N, ldx, w, O, H, bounds[j], bounds[j + 1], y);
}
