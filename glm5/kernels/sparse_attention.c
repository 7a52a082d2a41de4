/* Sparse MLA attention in absorbed (MQA) form over gathered latent rows, for CPUs, forward and backward:
 * the fast path of glm5.kernels.latent_attention (glm5.model.dsa.sparse_latent_attention, the engine).
 *
 * For each query n and head h, over the K latent rows rows[n, 0..K) of kv (a row of -1 is skipped):
 *     p[h, j] = softmax_j(scale * q[n, h, :D] . kv[rows[n, j], :D])
 *     out[n, h, :L] = sum_j p[h, j] * kv[rows[n, j], :L]                   (zeros when no row is valid)
 * In PyTorch this is a gather that copies K rows per query, two batched matmuls of tiny matrices and four
 * elementwise passes; here each row is read once, from where it lies, while it is in cache.
 * fp32 throughout; exp is a vector polynomial accurate to ~1 ulp (as torch's own vectorized exp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* out[h] = a_h . b over n floats for the 4 vectors a_h = a + h * stride (one pass over b) */
static inline void dot4(const float *a, int64_t stride, const float *b, int64_t n, float *out) {
    vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const vf x = *(const vf *)(b + i);
        s0 += *(const vf *)(a + i) * x;
        s1 += *(const vf *)(a + stride + i) * x;
        s2 += *(const vf *)(a + 2 * stride + i) * x;
        s3 += *(const vf *)(a + 3 * stride + i) * x;
    }
    hsum4(s0, s1, s2, s3, out);
    for (; i < n; i++)
        for (int h = 0; h < 4; h++) out[h] += a[h * stride + i] * b[i];
}

/* a += c * b over n floats */
static inline void axpy(float *a, float c, const float *b, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) *(vf *)(a + i) += c * *(const vf *)(b + i);
    for (; i < n; i++) a[i] += c * b[i];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc += *(const vf *)(a + i) * *(const vf *)(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[0..n) = sum_j w[j] * row[j][0..n): 8 vectors of out at a time in registers, so the FMAs over j form
 * independent chains (one accumulator would wait out each FMA's latency) */
static inline void weighted_rows(const float *w, const float **row, int64_t m, int64_t n, float *out) {
    int64_t c0 = 0;
    for (; c0 + VL <= n; c0 += 8 * VL) {
        const int64_t nvec = (n - c0) / VL < 8 ? (n - c0) / VL : 8;
        vf acc[8] = {{0}};
        for (int64_t j = 0; j < m; j++) {
            const float *r = row[j] + c0;
            for (int64_t v = 0; v < nvec; v++) acc[v] += w[j] * *(const vf *)(r + v * VL);
        }
        for (int64_t v = 0; v < nvec; v++) *(vf *)(out + c0 + v * VL) = acc[v];
        if (nvec < 8) {
            c0 += nvec * VL;
            break;
        }
    }
    for (; c0 < n; c0++) {
        float acc = 0.f;
        for (int64_t j = 0; j < m; j++) acc += w[j] * row[j][c0];
        out[c0] = acc;
    }
}

/* The valid rows of query n: pointers into kv and their row numbers; returns how many. */
static inline int64_t query_rows(const float *kv, const int64_t *rn, int64_t K, int64_t D, const float **row,
                                 int64_t *index) {
    int64_t m = 0;
    for (int64_t j = 0; j < K; j++)
        if (rn[j] >= 0) {
            index[m] = rn[j];
            row[m++] = kv + rn[j] * D;
        }
    return m;
}

/* probs[h * stride + j] = softmax_j(scale * q_h . row_j[:D]) for j < m. The entries from m to the next
 * multiple of VL are scratch. */
static void attention_probs(const float *qn, const float **row, int64_t m, int64_t H, int64_t D, float scale,
                            float *probs, int64_t stride) {
    for (int64_t j = 0; j < m; j++) {
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) {
            float s4[4];
            dot4(qn + h * D, D, row[j], D, s4);
            for (int i = 0; i < 4; i++) probs[(h + i) * stride + j] = s4[i] * scale;
        }
        for (; h < H; h++) probs[h * stride + j] = dot(qn + h * D, row[j], D) * scale;
    }
    for (int64_t h = 0; h < H; h++) {
        float *sh = probs + h * stride;
        for (int64_t j = m; j < (m + VL - 1) / VL * VL; j++) sh[j] = -INFINITY;   /* pad the last vector */
        vf vmax = *(const vf *)sh;  /* a vector max: a scalar one is a 4-cycle dependency per score */
        for (int64_t j = VL; j < m; j += VL) {
            const vf x = *(const vf *)(sh + j);
            const vi gt = x > vmax;
            vmax = (vf)(((vi)x & gt) | ((vi)vmax & ~gt));
        }
        float mx = vmax[0];
        for (int l = 1; l < VL; l++) mx = vmax[l] > mx ? vmax[l] : mx;
        vf total = {0};
        for (int64_t j = 0; j < m; j += VL) {
            vf e = vexp(*(vf *)(sh + j) - mx);
            *(vf *)(sh + j) = e;
            total += e;
        }
        const float inv = 1.0f / hsum(total);
        for (int64_t j = 0; j < m; j++) sh[j] *= inv;
    }
}

/* Per-thread scratch of both passes: probabilities (or their gradients) [H, K + VL], row pointers and numbers */
typedef struct {
    float *probs, *ds, *delta;
    const float **row;
    int64_t *index;
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->probs); free(s->ds); free(s->delta); free(s->row); free(s->index);
}

/* 0, or -1 (nothing left allocated) for an unsupported size (the limits glm5.kernels.sparse_attention checks
 * first) or no memory; with_grads: the backward's ds and delta too */
static int scratch_alloc(Scratch *s, int64_t H, int64_t K, int with_grads) {
    if (K > 4096 || H > 256) return -1;
    const int64_t stride = K + VL;
    s->probs = (float *)malloc(sizeof(float) * H * stride);
    s->row = (const float **)malloc(sizeof(float *) * (K + 1));
    s->index = (int64_t *)malloc(sizeof(int64_t) * (K + 1));
    s->ds = with_grads ? (float *)malloc(sizeof(float) * H * stride) : NULL;
    s->delta = with_grads ? (float *)malloc(sizeof(float) * H) : NULL;
    if (!s->probs || !s->row || !s->index || (with_grads && (!s->ds || !s->delta))) {
        scratch_free(s);
        return -1;
    }
    return 0;
}

/* q [N, H, D], kv [*, D] row-major, rows [N, K], out [N, H, L]; queries [n_begin, n_end). saved: NULL, or
 * [N, H, K] where the probabilities go (over each query's valid rows in order, for the backward). Returns 0,
 * or -1 for an unsupported size / no memory. */
int glm5_sparse_latent_attention(const float *q, const float *kv, const int64_t *rows, int64_t N, int64_t H,
                                 int64_t D, int64_t L, int64_t K, float scale, int64_t n_begin, int64_t n_end,
                                 float *out, float *saved) {
    (void)N;
    const int64_t stride = K + VL;
    Scratch scratch;
    if (scratch_alloc(&scratch, H, K, 0)) return -1;
    float *probs = scratch.probs;
    const float **row = scratch.row;
    int64_t *index = scratch.index;
    for (int64_t n = n_begin; n < n_end; n++) {
        const int64_t m = query_rows(kv, rows + n * K, K, D, row, index);
        float *o = out + n * H * L;
        if (m == 0) {
            memset(o, 0, sizeof(float) * H * L);
            continue;
        }
        attention_probs(q + n * H * D, row, m, H, D, scale, probs, stride);
        if (saved)  /* training: the backward reads these instead of recomputing them */
            for (int64_t h = 0; h < H; h++) memcpy(saved + (n * H + h) * K, probs + h * stride, sizeof(float) * m);
        /* out[h, :L] = sum_j p[h, j] * kv_j[:L] */
        for (int64_t h = 0; h < H; h++) weighted_rows(probs + h * stride, row, m, L, o + h * L);
    }
    scratch_free(&scratch);
    return 0;
}

/* The backward of the above for queries [n_begin, n_end): dq [N, H, D] is written, dkv [*, D] accumulated
 * (+=; a caller running threads at once gives each its own dkv or disjoint rows). With v_j = kv_j[:L] and
 * k_j = kv_j[:D] (the same row, both roles):
 *     dp[h, j] = dout_h . v_j,   ds[h, j] = p[h, j] * (dp[h, j] - dout_h . out_h)
 *     dq_h = scale * sum_j ds[h, j] k_j,   dk_j += scale * sum_h ds[h, j] q_h,   dv_j += sum_h p[h, j] dout_h
 * p comes from the forward (saved). */
int glm5_sparse_latent_attention_backward(const float *q, const float *kv, const int64_t *rows, const float *out,
                                          const float *saved, const float *dout, int64_t N, int64_t H, int64_t D,
                                          int64_t L, int64_t K, float scale, int64_t n_begin, int64_t n_end,
                                          float *dq, float *dkv) {
    (void)N;
    const int64_t stride = K + VL;
    Scratch scratch;
    if (scratch_alloc(&scratch, H, K, 1)) return -1;
    float *probs = scratch.probs, *ds = scratch.ds, *delta = scratch.delta;
    const float **row = scratch.row;
    int64_t *index = scratch.index;
    for (int64_t n = n_begin; n < n_end; n++) {
        const int64_t m = query_rows(kv, rows + n * K, K, D, row, index);
        float *dqn = dq + n * H * D;
        if (m == 0) {
            memset(dqn, 0, sizeof(float) * H * D);
            continue;
        }
        const float *qn = q + n * H * D, *don = dout + n * H * L, *on = out + n * H * L;
        for (int64_t h = 0; h < H; h++) memcpy(probs + h * stride, saved + (n * H + h) * K, sizeof(float) * m);
        for (int64_t h = 0; h < H; h++) delta[h] = dot(don + h * L, on + h * L, L);
        /* ds[h, j] = p (dout_h . v_j - delta_h), kept scaled by `scale`, overwriting nothing: a second array */
        for (int64_t j = 0; j < m; j++) {
            int64_t h = 0;
            for (; h + 4 <= H; h += 4) {
                float dp[4];
                dot4(don + h * L, L, row[j], L, dp);
                for (int i = 0; i < 4; i++) ds[(h + i) * stride + j] = scale * probs[(h + i) * stride + j] * (dp[i] - delta[h + i]);
            }
            for (; h < H; h++) ds[h * stride + j] = scale * probs[h * stride + j] * (dot(don + h * L, row[j], L) - delta[h]);
        }
        /* dkv_j += sum_h ds[h, j] q_h (the k role, D wide) + p[h, j] dout_h (the v role, L wide). One vector
         * column c at a time, four heads' q_h[c] and dout_h[c] held in registers while every row j updates its
         * own c: no dependency between rows, one read-modify-write per row and four heads */
        int64_t c = 0;
        for (; c + VL <= D; c += VL) {
            const int v_role = c + VL <= L;
            int64_t h = 0;
            for (; h + 4 <= H; h += 4) {
                const vf q0 = *(const vf *)(qn + h * D + c), q1 = *(const vf *)(qn + (h + 1) * D + c),
                         q2 = *(const vf *)(qn + (h + 2) * D + c), q3 = *(const vf *)(qn + (h + 3) * D + c);
                const float *g0 = ds + h * stride, *g1 = g0 + stride, *g2 = g1 + stride, *g3 = g2 + stride;
                const float *p0 = probs + h * stride, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
                if (v_role) {
                    const vf d0 = *(const vf *)(don + h * L + c), d1 = *(const vf *)(don + (h + 1) * L + c),
                             d2 = *(const vf *)(don + (h + 2) * L + c), d3 = *(const vf *)(don + (h + 3) * L + c);
                    for (int64_t j = 0; j < m; j++) {
                        vf *dr = (vf *)(dkv + index[j] * D + c);
                        *dr += (g0[j] * q0 + g1[j] * q1) + (g2[j] * q2 + g3[j] * q3) +
                               (p0[j] * d0 + p1[j] * d1) + (p2[j] * d2 + p3[j] * d3);
                    }
                } else {
                    for (int64_t j = 0; j < m; j++) {
                        vf *dr = (vf *)(dkv + index[j] * D + c);
                        *dr += (g0[j] * q0 + g1[j] * q1) + (g2[j] * q2 + g3[j] * q3);
                    }
                }
            }
            for (; h < H; h++) {
                const vf qh = *(const vf *)(qn + h * D + c);
                for (int64_t j = 0; j < m; j++) {
                    vf *dr = (vf *)(dkv + index[j] * D + c);
                    *dr += ds[h * stride + j] * qh;
                    if (v_role) *dr += probs[h * stride + j] * *(const vf *)(don + h * L + c);
                }
            }
        }
        /* the tails: the k role past the last full vector of D, the v role past the last full vector below L */
        const int64_t v_done = (L / VL) * VL < c ? (L / VL) * VL : c;
        for (int64_t j = 0; j < m && (c < D || v_done < L); j++) {
            float *dr = dkv + index[j] * D;
            for (int64_t h = 0; h < H; h++) {
                const float g = ds[h * stride + j], p = probs[h * stride + j];
                for (int64_t t = c; t < D; t++) dr[t] += g * qn[h * D + t];
                for (int64_t t = v_done; t < L; t++) dr[t] += p * don[h * L + t];
            }
        }
        /* dq_h = sum_j ds[h, j] k_j */
        for (int64_t h = 0; h < H; h++) weighted_rows(ds + h * stride, row, m, D, dqn + h * D);
    }
    scratch_free(&scratch);
    return 0;
}

/* The forward over query ranges [bounds[j], bounds[j + 1]), one job per thread */
int glm5_sparse_latent_attention_jobs(const float *q, const float *kv, const int64_t *rows, int64_t N, int64_t H,
                                      int64_t D, int64_t L, int64_t K, float scale, const int64_t *bounds,
                                      int64_t jobs, float *out, float *saved) {
    int rc = 0;
#pragma omp parallel for num_threads(jobs) schedule(static, 1) reduction(| : rc)
    for (int64_t j = 0; j < jobs; j++)
        rc |= glm5_sparse_latent_attention(q, kv, rows, N, H, D, L, K, scale, bounds[j], bounds[j + 1], out, saved);
    return rc;
}

/* The backward over query ranges, job j adding into dkv_buffers[j] (the same buffer for jobs owning disjoint
 * rows, or one per job) */
int glm5_sparse_latent_attention_backward_jobs(const float *q, const float *kv, const int64_t *rows, const float *out,
                                               const float *saved, const float *dout, int64_t N, int64_t H, int64_t D,
                                               int64_t L, int64_t K, float scale, const int64_t *bounds, int64_t jobs,
                                               float *dq, float *const *dkv_buffers) {
    int rc = 0;
#pragma omp parallel for num_threads(jobs) schedule(static, 1) reduction(| : rc)
    for (int64_t j = 0; j < jobs; j++)
        rc |= glm5_sparse_latent_attention_backward(q, kv, rows, out, saved, dout, N, H, D, L, K, scale, bounds[j],
                                                    bounds[j + 1], dq, dkv_buffers[j]);
    return rc;
}
