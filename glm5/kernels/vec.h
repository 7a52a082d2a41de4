/* Shared by glm5's CPU kernels: 16-float vectors in GCC / Clang vector extensions (one AVX-512 register;
 * two or four narrower ones elsewhere), horizontal sums and a vector exp. */
#ifndef GLM5_VEC_H
#define GLM5_VEC_H

#include <math.h>
#include <stdint.h>
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
/* the sums of four vectors at once: out[i] = sum of a_i's lanes (6 shuffles, 5 adds for all four) */
static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    vf x = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vf y = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vf z = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    z += __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    z += __builtin_shufflevector(z, z, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = z[0];
    out[1] = z[4];
    out[2] = z[8];
    out[3] = z[12];
}
#else
static inline float hsum(vf v) {
    float s[VL];
    memcpy(s, &v, sizeof s);
    float a = 0.f;
    for (int l = 0; l < VL; l++) a += s[l];
    return a;
}

static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
}
#endif

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

/* (defined in this header: each kernel library is one translation unit and exports it once)
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

#endif
