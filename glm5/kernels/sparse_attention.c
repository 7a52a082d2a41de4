/* Sparse MLA attention in absorbed (MQA) form over gathered latent rows, for CPUs:
 * glm5.kernels.sparse_latent_attention's fast path (inference only; training keeps PyTorch's autograd).
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

typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
#define VL 16

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
/* a tree of shuffles: 4 adds instead of 15 */
static inline float hsum(vf v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}
#else
static inline float hsum(vf v) {
    float s[VL];
    memcpy(s, &v, sizeof s);
    float a = 0.f;
    for (int l = 0; l < VL; l++) a += s[l];
    return a;
}
#endif

/* exp(x) for x <= 0 (softmax arguments after subtracting the max): Cephes' expf reduction and polynomial */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.3f;
    x = (vf)(((vi)x & (vi)(x > lo)) | ((vi)lo & ~(vi)(x > lo)));
    vf n = x * 1.44269504088896341f;                    /* round(x / ln 2) */
    n = n + ((vf){0} + 0.5f);
    vi ni = __builtin_convertvector(n, vi);
    vf nf = __builtin_convertvector(ni, vf);
    ni = ni + (nf > n);                                 /* floor for negative values (true is -1) */
    nf = __builtin_convertvector(ni, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf r2 = r * r;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    vi bits = (ni + 127) << 23;                         /* 2^n */
    return p * (vf)bits;
}

/* q [N, H, D], kv [*, D] row-major, rows [N, K], out [N, H, L]; queries [n_begin, n_end). scratch: none.
 * K <= 4096. Returns 0, or -1 for an unsupported size. */
int glm5_sparse_latent_attention(const float *q, const float *kv, const int64_t *rows, int64_t N, int64_t H,
                                 int64_t D, int64_t L, int64_t K, float scale, int64_t n_begin, int64_t n_end,
                                 float *out) {
    if (K > 4096 || H > 256) return -1;
    (void)N;
    float *scores = (float *)malloc(sizeof(float) * H * (K + VL));
    const float **row = (const float **)malloc(sizeof(float *) * (K + 1));
    if (!scores || !row) { free(scores); free(row); return -1; }
    const int64_t dv = D / VL * VL, lv = L / VL * VL;
    for (int64_t n = n_begin; n < n_end; n++) {
        const int64_t *rn = rows + n * K;
        int64_t m = 0;
        for (int64_t j = 0; j < K; j++)
            if (rn[j] >= 0) row[m++] = kv + rn[j] * D;
        float *o = out + n * H * L;
        if (m == 0) { memset(o, 0, sizeof(float) * H * L); continue; }
        const float *qn = q + n * H * D;
        /* scores[h, j] = scale * q_h . kv_j */
        for (int64_t j = 0; j < m; j++) {
            const float *r = row[j];
            for (int64_t h = 0; h < H; h++) {
                const float *qh = qn + h * D;
                vf acc = {0};
                int64_t d = 0;
                for (; d < dv; d += VL) acc += *(const vf *)(qh + d) * *(const vf *)(r + d);
                float s = hsum(acc);
                for (; d < D; d++) s += qh[d] * r[d];
                scores[h * (K + VL) + j] = s * scale;
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *sh = scores + h * (K + VL);
            float mx = sh[0];
            for (int64_t j = 1; j < m; j++) mx = sh[j] > mx ? sh[j] : mx;
            for (int64_t j = m; j < (m + VL - 1) / VL * VL; j++) sh[j] = -INFINITY;   /* pad the last vector */
            vf total = {0};
            for (int64_t j = 0; j < m; j += VL) {
                vf e = vexp(*(vf *)(sh + j) - mx);
                *(vf *)(sh + j) = e;
                total += e;
            }
            const float inv = 1.0f / hsum(total);
            for (int64_t j = 0; j < m; j++) sh[j] *= inv;
        }
        /* out[h, :L] = sum_j p[h, j] * kv_j[:L]: one output vector in a register while every row adds to it */
        for (int64_t h = 0; h < H; h++) {
            const float *ph = scores + h * (K + VL);
            float *oh = o + h * L;
            int64_t l = 0;
            for (; l < lv; l += VL) {
                vf acc = {0};
                for (int64_t j = 0; j < m; j++) acc += ph[j] * *(const vf *)(row[j] + l);
                *(vf *)(oh + l) = acc;
            }
            for (; l < L; l++) {
                float acc = 0.f;
                for (int64_t j = 0; j < m; j++) acc += ph[j] * row[j][l];
                oh[l] = acc;
            }
        }
    }
    free(scores);
    free(row);
    return 0;
}
