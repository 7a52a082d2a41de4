/* RMSNorm, SwiGLU and the MoE combine, forward and backward, for CPUs: glm5.kernels.elementwise's fast paths.
 *
 * In PyTorch each is 3-6 passes over the activations (pow, mean, rsqrt, two muls; silu, mul; and as many
 * again with saved intermediates in the backward), each a fresh tensor. Here each direction is one pass
 * per row (two for the RMSNorm backward's row dot product, which stays in L1). fp32 throughout.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* y[r] = w * x[r] * rstd[r], rstd[r] = 1 / sqrt(mean(x[r]^2) + eps); rows [r0, r1) of x [R, C]. */
void glm5_rmsnorm_forward(const float *x, const float *w, float eps, int64_t C, int64_t r0, int64_t r1, float *y,
                          float *rstd) {
    const int64_t cv = C / VL * VL;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C;
        vf acc = {0};
        int64_t c = 0;
        for (; c < cv; c += VL) {
            const vf v = *(const vf *)(xr + c);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; c < C; c++) ss += xr[c] * xr[c];
        const float s = 1.0f / sqrtf(ss / (float)C + eps);
        if (rstd) rstd[r] = s;
        for (c = 0; c < cv; c += VL) *(vf *)(yr + c) = *(const vf *)(w + c) * (*(const vf *)(xr + c) * s);
        for (; c < C; c++) yr[c] = w[c] * (xr[c] * s);
    }
}

/* dx[r] = rstd (w dy - xhat * mean(xhat * w dy)), xhat = x rstd; dw_partial += dy * xhat over rows [r0, r1)
 * (each thread its own dw_partial [C], summed by the caller). dw is summed in blocks of 32 rows first: one
 * running fp32 sum over thousands of rows loses ~6x more to rounding than torch's blocked reduction. */
void glm5_rmsnorm_backward(const float *x, const float *w, const float *rstd, const float *dy, int64_t C,
                           int64_t r0, int64_t r1, float *dx, float *dw_total) {
    const int64_t cv = C / VL * VL;
    float *dw_partial = (float *)calloc((size_t)C + VL, sizeof(float));
    if (!dw_partial) dw_partial = dw_total;  /* out of memory: one running sum (still correct) */
    for (int64_t r = r0; r < r1; r++) {
        if (dw_partial != dw_total && (r - r0) % 32 == 0 && r > r0) {
            for (int64_t c = 0; c < C; c++) dw_total[c] += dw_partial[c];
            memset(dw_partial, 0, sizeof(float) * C);
        }
        const float *xr = x + r * C, *gr = dy + r * C;
        float *dr = dx + r * C;
        const float s = rstd[r];
        vf acc = {0};
        int64_t c = 0;
        for (; c < cv; c += VL) {
            const vf xh = *(const vf *)(xr + c) * s, g = *(const vf *)(gr + c);
            acc += xh * (*(const vf *)(w + c) * g);
            *(vf *)(dw_partial + c) += g * xh;
        }
        float dot = hsum(acc);
        for (; c < C; c++) {
            const float xh = xr[c] * s;
            dot += xh * (w[c] * gr[c]);
            dw_partial[c] += gr[c] * xh;
        }
        const float mean = dot / (float)C;
        for (c = 0; c < cv; c += VL) {
            const vf xh = *(const vf *)(xr + c) * s;
            *(vf *)(dr + c) = s * (*(const vf *)(w + c) * *(const vf *)(gr + c) - xh * mean);
        }
        for (; c < C; c++) dr[c] = s * (w[c] * gr[c] - xr[c] * s * mean);
    }
    if (dw_partial != dw_total) {
        for (int64_t c = 0; c < C; c++) dw_total[c] += dw_partial[c];
        free(dw_partial);
    }
}

/* out[r, i] = silu(h[r, i]) * h[r, I + i] (gate then up, as glm5's fused gate_up weights); h rows have
 * stride `hs` floats (2 I for a contiguous [R, 2I]); rows [r0, r1). */
void glm5_swiglu_forward(const float *h, int64_t hs, int64_t I, int64_t r0, int64_t r1, float *out) {
    const int64_t iv = I / VL * VL;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = h + r * hs, *u = g + I;
        float *o = out + r * I;
        int64_t i = 0;
        for (; i < iv; i += VL) {
            const vf gv = *(const vf *)(g + i);
            *(vf *)(o + i) = gv * vsigmoid(gv) * *(const vf *)(u + i);
        }
        for (; i < I; i++) o[i] = g[i] * sigmoid1(g[i]) * u[i];
    }
}

/* dh[r, i] = dout * u * sig * (1 + g (1 - sig)),  dh[r, I + i] = dout * g * sig; rows [r0, r1). */
void glm5_swiglu_backward(const float *h, int64_t hs, const float *dout, int64_t I, int64_t r0, int64_t r1,
                          float *dh) {
    const int64_t iv = I / VL * VL;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = h + r * hs, *u = g + I, *d = dout + r * I;
        float *dg = dh + r * 2 * I, *du = dg + I;
        int64_t i = 0;
        for (; i < iv; i += VL) {
            const vf gv = *(const vf *)(g + i), dv = *(const vf *)(d + i), sg = vsigmoid(gv);
            *(vf *)(dg + i) = dv * *(const vf *)(u + i) * sg * (1.0f + gv * (1.0f - sg));
            *(vf *)(du + i) = dv * gv * sg;
        }
        for (; i < I; i++) {
            const float sg = sigmoid1(g[i]);
            dg[i] = d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
            du[i] = d[i] * g[i] * sg;
        }
    }
}

/* MoE combine: out[n] = sum_j w[inv[n, j]] * ys[inv[n, j]] over a token's k expert rows (inv: the row of
 * each (token, choice) in the expert-grouped order; w NULL = weights 1). A gather per token, so tokens
 * [n0, n1) can run in parallel without two threads adding into one output row. */
void glm5_moe_combine(const float *ys, const float *w, const int64_t *inv, int64_t k, int64_t H, int64_t n0,
                      int64_t n1, float *out) {
    const int64_t hv = H / VL * VL;
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * H;
        for (int64_t c = 0; c < hv; c += VL) {
            vf acc = {0};
            for (int64_t j = 0; j < k; j++) {
                const int64_t r = inv[n * k + j];
                acc += (w ? w[r] : 1.0f) * *(const vf *)(ys + r * H + c);
            }
            *(vf *)(o + c) = acc;
        }
        for (int64_t c = hv; c < H; c++) {
            float acc = 0.f;
            for (int64_t j = 0; j < k; j++) {
                const int64_t r = inv[n * k + j];
                acc += (w ? w[r] : 1.0f) * ys[r * H + c];
            }
            o[c] = acc;
        }
    }
}

/* Its backward for rows [r0, r1): dys[r] = w[r] * dout[token[r]], dw[r] = dout[token[r]] . ys[r] */
void glm5_moe_combine_backward(const float *dout, const float *ys, const float *w, const int64_t *token, int64_t H,
                               int64_t r0, int64_t r1, float *dys, float *dw) {
    const int64_t hv = H / VL * VL;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = dout + token[r] * H, *y = ys + r * H;
        float *d = dys + r * H;
        vf acc = {0};
        for (int64_t c = 0; c < hv; c += VL) {
            const vf gv = *(const vf *)(g + c);
            *(vf *)(d + c) = w[r] * gv;
            acc += gv * *(const vf *)(y + c);
        }
        float dot = hsum(acc);
        for (int64_t c = hv; c < H; c++) {
            d[c] = w[r] * g[c];
            dot += g[c] * y[c];
        }
        dw[r] = dot;
    }
}

/* Each kernel over row ranges [bounds[j], bounds[j + 1]), one job per thread */
void glm5_rmsnorm_forward_jobs(const float *x, const float *w, float eps, int64_t C, const int64_t *bounds,
                               int64_t jobs, float *y, float *rstd) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++) glm5_rmsnorm_forward(x, w, eps, C, bounds[j], bounds[j + 1], y, rstd);
}

void glm5_rmsnorm_backward_jobs(const float *x, const float *w, const float *rstd, const float *dy, int64_t C,
                                const int64_t *bounds, int64_t jobs, float *dx, float *const *dw_partials) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++)
        glm5_rmsnorm_backward(x, w, rstd, dy, C, bounds[j], bounds[j + 1], dx, dw_partials[j]);
}

void glm5_swiglu_forward_jobs(const float *h, int64_t hs, int64_t I, const int64_t *bounds, int64_t jobs, float *out) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++) glm5_swiglu_forward(h, hs, I, bounds[j], bounds[j + 1], out);
}

void glm5_swiglu_backward_jobs(const float *h, int64_t hs, const float *dout, int64_t I, const int64_t *bounds,
                               int64_t jobs, float *dh) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++) glm5_swiglu_backward(h, hs, dout, I, bounds[j], bounds[j + 1], dh);
}

void glm5_moe_combine_jobs(const float *ys, const float *w, const int64_t *inv, int64_t k, int64_t H,
                           const int64_t *bounds, int64_t jobs, float *out) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++) glm5_moe_combine(ys, w, inv, k, H, bounds[j], bounds[j + 1], out);
}

void glm5_moe_combine_backward_jobs(const float *dout, const float *ys, const float *w, const int64_t *token,
                                    int64_t H, const int64_t *bounds, int64_t jobs, float *dys, float *dw) {
#pragma omp parallel for num_threads(jobs) schedule(static, 1)
    for (int64_t j = 0; j < jobs; j++)
        glm5_moe_combine_backward(dout, ys, w, token, H, bounds[j], bounds[j + 1], dys, dw);
}
