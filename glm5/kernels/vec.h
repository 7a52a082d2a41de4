/* Shared by glm5's CPU kernels: float vectors of the CPU's own register width in GCC / Clang vector
 * extensions, horizontal sums and a vector exp.
 *
 * VL (floats per vector) follows the instruction set the library is compiled for (glm5.kernels.build picks
 * it: avx512, avx2, neon or portable): 16 with AVX-512, 8 with AVX2, 4 with NEON or SSE2. A vector wider than
 * the registers is legal C but the compiler splits every operation into several, and a kernel that keeps
 * 16 accumulators in registers then keeps 32 or 64 and spills them to the stack on every FMA: that made the
 * AVX2 build of the indexer 10-20x slower than the AVX-512 one, and slower than PyTorch.
 * REGS: the vector registers the kernels may plan to keep live (32 on AVX-512 and AArch64, 16 elsewhere). */
#ifndef GLM5_VEC_H
#define GLM5_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(GLM5_PORTABLE)
#define VL 4
#define REGS 16
#elif defined(__AVX512F__)
#define VL 16
#define REGS 32
#elif defined(__AVX__)
#define VL 8
#define REGS 16
#elif defined(__aarch64__)
#define VL 4
#define REGS 32
#else
#define VL 4
#define REGS 16
#endif

typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4), aligned(4)));

/* The name of the instruction set this translation unit was compiled for (glm5.kernels reports it) */
#if defined(GLM5_PORTABLE)
#define GLM5_ISA_NAME "portable"
#elif defined(__AVX512F__)
#define GLM5_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define GLM5_ISA_NAME "avx2"
#elif defined(__aarch64__) || defined(__ARM_NEON)
#define GLM5_ISA_NAME "neon"
#else
#define GLM5_ISA_NAME "portable"
#endif

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
/* horizontal sums as trees of shuffles (hsum: log2(VL) adds; hsum4: the four sums in one vector) */
#define SHUF __builtin_shufflevector
#if VL == 16
static inline float hsum(vf v) {
    v += SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}
static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    vf x = SHUF(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vf y = SHUF(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vf z = SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    z += SHUF(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    z += SHUF(z, z, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = z[0];
    out[1] = z[4];
    out[2] = z[8];
    out[3] = z[12];
}
#elif VL == 8
static inline float hsum(vf v) {
    v += SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}
static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    vf x = SHUF(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);  /* a0 | a1 */
    vf y = SHUF(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);  /* a2 | a3 */
    vf z = SHUF(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(x, y, 2, 3, 10, 11, 6, 7, 14, 15);      /* a0 a2 a1 a3 */
    z += SHUF(z, z, 1, 0, 3, 2, 5, 4, 7, 6);
    out[0] = z[0];
    out[1] = z[4];
    out[2] = z[2];
    out[3] = z[6];
}
#else
static inline float hsum(vf v) {
    v += SHUF(v, v, 2, 3, 0, 1);
    v += SHUF(v, v, 1, 0, 3, 2);
    return v[0];
}
static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    vf x = SHUF(a0, a1, 0, 1, 4, 5) + SHUF(a0, a1, 2, 3, 6, 7);   /* a0 a0 a1 a1 */
    vf y = SHUF(a2, a3, 0, 1, 4, 5) + SHUF(a2, a3, 2, 3, 6, 7);   /* a2 a2 a3 a3 */
    vf z = SHUF(x, y, 0, 2, 4, 6) + SHUF(x, y, 1, 3, 5, 7);
    memcpy(out, &z, sizeof z);
}
#endif
#undef SHUF
#else
/* the sum of a vector's lanes: halves added log2(VL) times */
static inline float hsum(vf v) {
    float s[VL];
    memcpy(s, &v, sizeof s);
    for (int width = VL / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) s[l] += s[l + width];
    return s[0];
}

static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
}
#endif

static inline float hmax(vf v) {
    float s[VL];
    memcpy(s, &v, sizeof s);
    float m = s[0];
    for (int l = 1; l < VL; l++) m = s[l] > m ? s[l] : m;
    return m;
}

/* whether any lane of a comparison result is true */
static inline int any_lane(vi v) {
    int32_t s[VL];
    memcpy(s, &v, sizeof s);
    int32_t a = 0;
    for (int l = 0; l < VL; l++) a |= s[l];
    return a != 0;
}

static inline vf vmax(vf a, vf b) {
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

static inline vf relu(vf x) {
    const vf zero = {0};
    return (vf)((vi)x & (vi)(x > zero));
}

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

/* sigmoid for either sign of g, vectors and scalars (SiLU(g) = g sigmoid(g)) */
static inline vf vsigmoid(vf g) {
    /* 1 / (1 + exp(-g)) for either sign through exp of a non-positive argument: e = exp(-|g|) */
    const vi neg = g < (vf){0};
    const vf a = (vf)((vi)g & ~neg) - (vf)((vi)g & neg);   /* |g| */
    const vf e = vexp((vf){0} - a);
    const vf pos_s = 1.0f / (1.0f + e), neg_s = e / (1.0f + e);
    return (vf)(((vi)neg_s & neg) | ((vi)pos_s & ~neg));
}

static inline float sigmoid1(float g) {
    const float e = expf(-fabsf(g));
    return g >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

/* y[r * ldy] = <w, x + r * ldx> over n floats, for R <= 4 rows (R a constant after inlining: the accumulators
 * stay in registers); one read of w for all rows (the few-row products of linear.c and experts.c) */
static inline __attribute__((always_inline)) void dot_rows(const float *w, int64_t n, const float *x, int64_t ldx,
                                                          const int R, float *y, int64_t ldy) {
    vf acc[4];
    for (int r = 0; r < R; r++) acc[r] = (vf){0};
    const int64_t nv = n / VL * VL;
    int64_t i = 0;
    for (; i < nv; i += VL) {
        const vf a = *(const vf *)(w + i);
        for (int r = 0; r < R; r++) acc[r] += a * *(const vf *)(x + r * ldx + i);
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(acc[r]);
        for (int64_t t = i; t < n; t++) s += w[t] * x[r * ldx + t];
        y[r * ldy] = s;
    }
}

/* (defined in this header: each kernel library is one translation unit and exports them once)
 * 1 when built with OpenMP: the *_jobs entry points then run their jobs on OpenMP threads, which are torch's
 * own (the library links libgomp.so.1, the one torch already loaded), so no second pool competes with torch's
 * spinning workers for the cores. 0: the jobs run one after another and the caller threads them itself. */
int glm5_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* the instruction set the library was compiled for, and its vector width in floats */
const char *glm5_isa(void) { return GLM5_ISA_NAME; }
int glm5_vector_floats(void) { return VL; }

#endif
