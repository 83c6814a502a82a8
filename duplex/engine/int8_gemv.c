/* Int8 weight-only mat-vecs for CPU decode: a few bf16 activation rows (A [M, K]) against int8
 * weight rows (B [N, K], one bf16 scale per row in S [N]) -> C [M, N] bf16. Built at first use by
 * duplex.engine.int8_kernel (gcc -O3 -mavx2 -mfma -fopenmp); OpenMP gives each thread a
 * contiguous slice of weight rows, which it streams once, in order, with a software prefetch.
 *
 * duplex_int8_q16_gemv_bf16 (the default): each activation row is quantized once per call to
 * int16 with one scale per row (amax / 32767, round to nearest). Dot products are exact integer
 * arithmetic (weights sign-extended to int16 once per tile, vpmaddwd, int32 lanes: |lane| <= k/8 *
 * 32767 * 127 < 2^31 for k <= 4128, longer rows sum 4096-k chunks in double) converted once per
 * output, then scaled by the row's and the weight row's scales and rounded to bf16. The error
 * against the exact product is the activation rounding: <= amax / 65534 per element, and since
 * amax <= sqrt(K) * rms(row), its L2 norm is <= sqrt(K) / 65534 * |row| (6e-4 |row| at K = 1536),
 * below the bf16 rounding the inputs already carry; the bf16 output rounding (~0.2 %) dominates.
 * (Per-block scales, as before, cost a float conversion and an fma per 32 weights per row, which
 * made each extra decode row cost ~1/4 of the weight stream.) Tiles of 2 weight rows x 4 activation
 * rows (4 x 1 for a single row) keep 8 int32 accumulators in registers: per 16 weights and output,
 * one vpmaddwd and one add; the tile's weights are reused from L1 for every 4 rows and each
 * activation load for 2 weight rows. Results do not depend on the tiling or the thread count
 * (exact sums), so a row gives the same output alone or batched.
 *
 * duplex_int8_q8_gemv_bf16: llama.cpp's Q8_0 x int8: activations rounded to int8 per block of 32,
 * block dots with vpmaddubsw on |x| and sign(x) * w, then vpmaddwd. Weights must lie in
 * [-127, 127] (the sign trick overflows on -128). 5 instructions per 32 weights, but no faster
 * than q16 where both are memory-bound, and ~0.5 % relative error per output (the 8-bit rounding).
 *
 * duplex_int8_gemv_bf16: bit-identical to ATen's AVX2 _weight_int8pack_mm.
 * C[m, n] = bf16( sum_k A[m, k] * (B[n, k] * S[n]) ), accumulated per 8-lane fp32 vector in k
 * order (step 8, one fma per step), then reduced with ATen's horizontal-add tree and rounded to
 * bf16 (nearest even). Every output uses the same operations in the same order as ATen's AVX2
 * kernel, so results are equal bit for bit; what differs is the schedule: A is converted to fp32
 * once per call instead of once per 4 weight rows, and one activation row is applied to 8 weight
 * rows at a time (8 independent fma chains instead of 4). Instruction-bound (~14 GB/s here).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round-to-nearest-even */
    uint32_t u;
    if (f != f) return 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

static inline float hsum(__m256 v) { /* ATen's _mm256_reduce_add_ps, same order */
    __m256 v1 = _mm256_permute2f128_ps(v, v, 0x1);
    v = _mm256_add_ps(v, v1);
    v1 = _mm256_shuffle_ps(v, v, 0x4E);
    v = _mm256_add_ps(v, v1);
    v1 = _mm256_shuffle_ps(v, v, 0xB1);
    v = _mm256_add_ps(v, v1);
    return _mm256_cvtss_f32(v);
}

static inline __m256 load_w(const int8_t* p, __m256 scale) {
    __m256i w32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(w32), scale);
}

/* one activation row x [K] (fp32) against weight rows n0..n0+NR */
#define ROWS8(NR)                                                                          \
    do {                                                                                   \
        __m256 acc[NR], sc[NR];                                                            \
        for (int r = 0; r < NR; ++r) {                                                     \
            acc[r] = _mm256_setzero_ps();                                                  \
            sc[r] = _mm256_set1_ps(bf16_to_f32(S[n + r]));                                 \
        }                                                                                  \
        const int8_t* w = B + (int64_t)n * K;                                              \
        for (int k = 0; k < K; k += 8) {                                                   \
            __m256 a = _mm256_loadu_ps(x + k);                                             \
            for (int r = 0; r < NR; ++r)                                                   \
                acc[r] = _mm256_fmadd_ps(a, load_w(w + (int64_t)r * K + k, sc[r]), acc[r]); \
        }                                                                                  \
        for (int r = 0; r < NR; ++r) out[n + r] = f32_to_bf16(hsum(acc[r]));               \
    } while (0)

/* weight rows n_begin..n_end against all M activation rows; each 8-row weight block is reused
 * from L1 for every activation row (ragged batches of a few decode tokens) */
static void row_block(const float* xs, const int8_t* B, const uint16_t* S, uint16_t* C,
                      int n_begin, int n_end, int M, int N, int K) {
    int n = n_begin;
    for (; n + 8 <= n_end; n += 8)
        for (int m = 0; m < M; ++m) {
            const float* x = xs + (int64_t)m * K;
            uint16_t* out = C + (int64_t)m * N;
            ROWS8(8);
        }
    for (; n < n_end; ++n)
        for (int m = 0; m < M; ++m) {
            const float* x = xs + (int64_t)m * K;
            uint16_t* out = C + (int64_t)m * N;
            ROWS8(1);
        }
}

/* A [M, K] bf16, B [N, K] int8, S [N] bf16, C [M, N] bf16; K % 8 == 0. */
int duplex_int8_gemv_bf16(const uint16_t* A, const int8_t* B, const uint16_t* S, uint16_t* C,
                          int M, int N, int K) {
    if (K % 8) return -1;
    float* x = (float*)malloc(sizeof(float) * (size_t)M * (size_t)K);
    if (!x) return -2;
    for (int64_t i = 0; i < (int64_t)M * K; ++i) x[i] = bf16_to_f32(A[i]);
    /* contiguous slices of weight rows per thread, multiples of 8 rows */
#pragma omp parallel
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        int blocks = (N + 7) / 8;
        int b0 = (int)((int64_t)blocks * t / nt), b1 = (int)((int64_t)blocks * (t + 1) / nt);
        int n0 = b0 * 8, n1 = b1 * 8 < N ? b1 * 8 : N;
        if (n0 < n1) row_block(x, B, S, C, n0, n1, M, N, K);
    }
    free(x);
    return 0;
}

/* ---- Q8_0 activations x int8 weights ---------------------------------------------------- */

#define QK 32

static inline int thread_slice(int blocks, int* b0, int* b1) {
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    int t = 0, nt = 1;
#endif
    *b0 = (int)((int64_t)blocks * t / nt);
    *b1 = (int)((int64_t)blocks * (t + 1) / nt);
    return *b0 < *b1;
}

static inline int thread_num(void) {
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int max_threads(void) {
#ifdef _OPENMP
    extern int omp_get_max_threads(void);
    int n = omp_get_max_threads();
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline __m256 load_bf16x8(const uint16_t* p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

/* one bf16 row [K] -> q [nb * 32] int8 (the tail block zero-padded), |q| as uint8, d [nb] fp32 */
static void quantize_row_q8(const uint16_t* a, int K, int8_t* q, uint8_t* aq, float* d) {
    int nb = (K + QK - 1) / QK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < nb; ++b) {
        float buf[QK];
        __m256 v[4];
        int len = K - b * QK < QK ? K - b * QK : QK;
        if (len == QK) {
            for (int j = 0; j < 4; ++j) v[j] = load_bf16x8(a + b * QK + 8 * j);
        } else {
            for (int j = 0; j < QK; ++j) buf[j] = j < len ? bf16_to_f32(a[b * QK + j]) : 0.0f;
            for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(buf + 8 * j);
        }
        __m256 mx = _mm256_andnot_ps(sign, v[0]);
        for (int j = 1; j < 4; ++j) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        float amax = hmax8(mx);
        float dd = amax / 127.0f;
        d[b] = dd;
        __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i i[4];
        for (int j = 0; j < 4; ++j)
            i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        p = _mm256_permutevar8x32_epi32(p, perm); /* undo the per-lane interleave of the packs */
        _mm256_storeu_si256((__m256i*)(q + b * QK), p);
        _mm256_storeu_si256((__m256i*)(aq + b * QK), _mm256_sign_epi8(p, p));
    }
}

/* exact int32 dot of 32 activations (|x| unsigned, x signed) with 32 weights, as 8 int32 lanes */
static inline __m256i dot32(__m256i ax, __m256i sx, __m256i w) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, sx)), ones);
}

#ifndef Q_PF
#define Q_PF 1024 /* software prefetch distance in bytes: the row stream runs at DRAM speed */
#endif
#ifndef Q_PF_START
#define Q_PF_START 4096 /* bytes of the next step's rows each thread prefetches before a barrier */
#endif
#define Q_U 2     /* accumulators per output: blocks alternate between them (fma latency) */
#define Q_MT 4    /* activation rows per pass over a weight row (each weight load reused) */

/* weight row w [K] against MT quantized activation rows (qx, ux, dx: row j at + j * kp / nb);
 * out[j * N] = bf16(row scale * sum over blocks of dx * exact int32 block dot) */
static inline __attribute__((always_inline)) void q8_row(const int8_t* w, float scale, const int8_t* qx,
                                                         const uint8_t* ux, const float* dx, uint16_t* out,
                                                         int K, int64_t kp, int nb, int64_t N, const int MT) {
    __m256 acc[Q_MT][Q_U];
    int nfull = K / QK;
    for (int j = 0; j < MT; ++j)
        for (int u = 0; u < Q_U; ++u) acc[j][u] = _mm256_setzero_ps();
    int b = 0;
    for (; b + Q_U <= nfull; b += Q_U)
        for (int u = 0; u < Q_U; ++u) {
            const int8_t* wp = w + (int64_t)(b + u) * QK;
            _mm_prefetch((const char*)(wp + Q_PF), _MM_HINT_T0);
            __m256i wv = _mm256_loadu_si256((const __m256i*)wp);
            for (int j = 0; j < MT; ++j) {
                __m256i sx = _mm256_loadu_si256((const __m256i*)(qx + j * kp + (b + u) * QK));
                __m256i ax = _mm256_loadu_si256((const __m256i*)(ux + j * kp + (b + u) * QK));
                acc[j][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, sx, wv)),
                                            _mm256_broadcast_ss(dx + j * nb + b + u), acc[j][u]);
            }
        }
    for (; b < nb; ++b) { /* the odd last full block, then a partial one (weights zero-padded) */
        int8_t tail[QK] = {0};
        const int8_t* wp = w + (int64_t)b * QK;
        if (b >= nfull) {
            memcpy(tail, wp, (size_t)(K - b * QK));
            wp = tail;
        }
        __m256i wv = _mm256_loadu_si256((const __m256i*)wp);
        for (int j = 0; j < MT; ++j) {
            __m256i sx = _mm256_loadu_si256((const __m256i*)(qx + j * kp + b * QK));
            __m256i ax = _mm256_loadu_si256((const __m256i*)(ux + j * kp + b * QK));
            acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, sx, wv)),
                                        _mm256_broadcast_ss(dx + j * nb + b), acc[j][0]);
        }
    }
    for (int j = 0; j < MT; ++j) {
        for (int u = 1; u < Q_U; ++u) acc[j][0] = _mm256_add_ps(acc[j][0], acc[j][u]);
        out[j * N] = f32_to_bf16(hsum(acc[j][0]) * scale);
    }
}

/* A [M, K] bf16, B [N, K] int8 in [-127, 127], S [N] bf16, C [M, N] bf16. */
int duplex_int8_q8_gemv_bf16(const uint16_t* A, const int8_t* B, const uint16_t* S, uint16_t* C,
                             int M, int N, int K) {
    if (M < 1 || N < 1 || K < 1) return -1;
    int nb = (K + QK - 1) / QK;
    int64_t kp = (int64_t)nb * QK;
    int8_t* qxs = (int8_t*)aligned_alloc(32, (size_t)(2 * kp * M));
    float* dxs = (float*)malloc(sizeof(float) * (size_t)nb * (size_t)M);
    if (!qxs || !dxs) {
        free(qxs);
        free(dxs);
        return -2;
    }
    uint8_t* uxs = (uint8_t*)(qxs + kp * M);
    for (int m = 0; m < M; ++m)
        quantize_row_q8(A + (int64_t)m * K, K, qxs + kp * m, uxs + kp * m, dxs + (int64_t)nb * m);
    /* contiguous slices of weight rows per thread: each thread streams its slice once, in order */
#pragma omp parallel
    {
        int n0, n1;
        if (thread_slice(N, &n0, &n1))
            for (int n = n0; n < n1; ++n) {
                const int8_t* w = B + (int64_t)n * K;
                float scale = bf16_to_f32(S[n]);
                int m = 0;
                for (; m + Q_MT <= M; m += Q_MT)
                    q8_row(w, scale, qxs + kp * m, uxs + kp * m, dxs + (int64_t)nb * m, C + (int64_t)m * N + n,
                           K, kp, nb, N, Q_MT);
                switch (M - m) {
                    case 3: q8_row(w, scale, qxs + kp * m, uxs + kp * m, dxs + (int64_t)nb * m,
                                   C + (int64_t)m * N + n, K, kp, nb, N, 3); break;
                    case 2: q8_row(w, scale, qxs + kp * m, uxs + kp * m, dxs + (int64_t)nb * m,
                                   C + (int64_t)m * N + n, K, kp, nb, N, 2); break;
                    case 1: q8_row(w, scale, qxs + kp * m, uxs + kp * m, dxs + (int64_t)nb * m,
                                   C + (int64_t)m * N + n, K, kp, nb, N, 1); break;
                    default: break;
                }
            }
    }
    free(qxs);
    free(dxs);
    return 0;
}

/* ---- Q16 activations (int16, one scale per row) x int8 weights ---------------------------- */

#ifndef Q16_MT
#define Q16_MT 4 /* activation rows per pass over a tile of weight rows (each weight load reused) */
#endif
#ifndef Q16_NR
#define Q16_NR 2 /* weight rows per tile (each activation load reused) */
#endif
#define Q_MB 16       /* activation rows per sweep over a thread's weight slice (their int16 rows stay in cache) */
#define Q16_CHUNK 4096 /* k per int32 accumulation: an int32 lane sums k / 8 products of |x| <= 32767 and
                        * |w| <= 127, < 2^31 up to k = 4128; longer rows add chunk sums in double */

/* one bf16 row [K] -> q [kp] int16 (zero-padded past K) with one scale: returns it (amax / 32767).
 * Round to nearest: each value's error is at most amax / 65534. */
static float quantize_row_q16(const uint16_t* a, int K, int64_t kp, int16_t* q) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int k8 = K & ~7;
    __m256 mx = _mm256_setzero_ps();
    for (int k = 0; k < k8; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, load_bf16x8(a + k)));
    float amax = hmax8(mx);
    for (int k = k8; k < K; ++k) {
        float v = fabsf(bf16_to_f32(a[k]));
        if (v > amax) amax = v;
    }
    float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    __m256 id = _mm256_set1_ps(inv);
    for (int k = 0; k < k8; k += 8) {
        __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(a + k), id)); /* MXCSR: nearest even */
        _mm_storeu_si128((__m128i*)(q + k),
                         _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
    }
    for (int k = k8; k < K; ++k) q[k] = (int16_t)lrintf(bf16_to_f32(a[k]) * inv);
    for (int64_t k = K; k < kp; ++k) q[k] = 0;
    return amax / 32767.0f;
}

static inline __m256i widen16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }

static inline double hsum_epi32_exact(__m256i v) { /* 8 int32 lanes summed without overflow */
    __m256d s = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(v)),
                              _mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1)));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

/* acc[j][r] += the int16 rows qx + j * kp times the int8 weight rows w + r * K over 16 k from k */
#define Q16STEP(K_)                                                                                  \
    do {                                                                                             \
        __m256i wv[Q16_NR > 4 ? Q16_NR : 4];                                                             \
        for (int r = 0; r < NR; ++r) wv[r] = widen16(w + r * (int64_t)K + (K_));                     \
        for (int j = 0; j < MT; ++j) {                                                               \
            __m256i xv = _mm256_load_si256((const __m256i*)(qx + j * kp + (K_)));                    \
            for (int r = 0; r < NR; ++r) {                                                           \
                acc[j][r] = _mm256_add_epi32(acc[j][r], _mm256_madd_epi16(wv[r], xv));                \
                __asm__("" : "+x"(acc[j][r])); /* one accumulator register each: no reassociation */ \
            }                                                                                        \
        }                                                                                            \
    } while (0)

/* C[j * N + n + r] = (R[j * N + n + r] +) bf16(S[n + r] * dx[j] * sum_k qx[j, k] * w[n + r, k]) for
 * j < MT activation rows and r < NR weight rows: exact int32 block sums, one conversion per output */
static inline __attribute__((always_inline)) void q16_tile(const int8_t* w, const uint16_t* S, const int16_t* qx,
                                                           const float* dx, uint16_t* C, const uint16_t* R, int K,
                                                           int64_t kp, int64_t N, int pf, const int MT, const int NR) {
    double tot[Q16_MT > 4 ? Q16_MT : 4][Q16_NR > 4 ? Q16_NR : 4] = {{0}};
    __m256i acc[Q16_MT > 4 ? Q16_MT : 4][Q16_NR > 4 ? Q16_NR : 4];
    int kfull = K & ~15;
    for (int k0 = 0; k0 < K; k0 += Q16_CHUNK) {
        int k1 = K - k0 <= Q16_CHUNK ? K : k0 + Q16_CHUNK;
        int k1f = k1 < kfull ? k1 : kfull;
        for (int j = 0; j < MT; ++j)
            for (int r = 0; r < NR; ++r) acc[j][r] = _mm256_setzero_si256();
        int k = k0;
        for (; k + 64 <= k1f; k += 64) {
            if (pf) /* the tile's NR rows are one contiguous stream, NR * 64 bytes per step: run ahead of it */
                for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(w + NR * ((int64_t)K + k) + Q_PF + r * 64), _MM_HINT_T0);
            Q16STEP(k);
            Q16STEP(k + 16);
            Q16STEP(k + 32);
            Q16STEP(k + 48);
        }
        for (; k < k1f; k += 16) Q16STEP(k);
        if (k < k1) { /* the last k % 16 weights, zero-padded (qx is zero past K) */
            __m256i wv[Q16_NR > 4 ? Q16_NR : 4];
            for (int r = 0; r < NR; ++r) {
                int8_t tail[16] = {0};
                memcpy(tail, w + r * (int64_t)K + k, (size_t)(k1 - k));
                wv[r] = widen16(tail);
            }
            for (int j = 0; j < MT; ++j) {
                __m256i xv = _mm256_load_si256((const __m256i*)(qx + j * kp + k));
                for (int r = 0; r < NR; ++r) acc[j][r] = _mm256_add_epi32(acc[j][r], _mm256_madd_epi16(wv[r], xv));
            }
        }
        for (int j = 0; j < MT; ++j)
            for (int r = 0; r < NR; ++r) tot[j][r] += hsum_epi32_exact(acc[j][r]);
    }
    for (int j = 0; j < MT; ++j)
        for (int r = 0; r < NR; ++r) {
            uint16_t y = f32_to_bf16((float)(tot[j][r] * ((double)dx[j] * (double)bf16_to_f32(S[r]))));
            C[j * N + r] = R ? f32_to_bf16(bf16_to_f32(R[j * N + r]) + bf16_to_f32(y)) : y;
        }
}

#define Q16_TILE(MT_, NR_) \
    q16_tile(B + (int64_t)n * K, S + n, qx + kp * m, dx + m, C + (int64_t)m * N + n, \
             R ? R + (int64_t)m * N + n : NULL, K, kp, N, m == m0, MT_, NR_)

#define Q16_ROWS(NR_)                                                             \
    do {                                                                          \
        int m = m0;                                                               \
        for (; m + Q16_MT <= m1; m += Q16_MT) Q16_TILE(Q16_MT, NR_);                    \
        switch (m1 - m) {                                                         \
            case 5: Q16_TILE(5 < Q16_MT ? 5 : 1, NR_); break;                       \
            case 4: Q16_TILE(4 < Q16_MT ? 4 : 1, NR_); break;                       \
            case 3: Q16_TILE(3, NR_); break;                                      \
            case 2: Q16_TILE(2, NR_); break;                                      \
            case 1: Q16_TILE(1, NR_); break;                                      \
            default: break;                                                       \
        }                                                                         \
    } while (0)

/* ---- the same q16 tiles on AVX-512 VNNI --------------------------------------------------------
 * Where the CPU has AVX512BW and AVX512-VNNI, one vpdpwssd multiplies 32 int16 pairs and adds
 * them into 16 int32 lanes: the work of 2 vpmaddwd + 2 vpaddd on AVX2. A decode row is bound by
 * the weight stream either way; what this buys is the extra rows of a batched tick (8 sessions'
 * tokens), which were compute-bound. The sums are exact integers on both paths (a lane adds
 * k / 16 products here, fewer than AVX2's k / 8), so the outputs are bit-identical to the AVX2
 * tiles: which path runs changes no result. Tiles of up to 4 weight rows x 4 activation rows
 * (16 of the 32 zmm registers as accumulators). */

/* compilers too old for these intrinsics (gcc < 9, clang < 8) build the AVX2 tiles only */
#if (defined(__clang__) && __clang_major__ >= 8) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 9)
#define DUPLEX_HAVE_Q512 1
#define Q512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

static int q16_isa512 = -1; /* -1: not decided yet; 0: AVX2 tiles; 1: AVX-512 VNNI tiles; 2: and AMX */
static int q16_max_isa = 2;  /* what duplex_q16_set_isa allows */

#ifdef DUPLEX_HAVE_AMX
#define DUPLEX_HAVE_QAMX 1
static int q16_amx_available(void) { return duplex_amx_available(DUPLEX_AMX_INT8_BIT); }
#else
static int q16_amx_available(void) { return 0; }
#endif

static int q16_use512(void) {
    if (q16_isa512 < 0) {
        __builtin_cpu_init();
        q16_isa512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
        if (q16_isa512 && q16_max_isa >= 2 && q16_amx_available()) q16_isa512 = 2;
        if (q16_isa512 > q16_max_isa) q16_isa512 = q16_max_isa;
    }
    return q16_isa512;
}

/* cap the path (0: AVX2, 1: AVX-512 VNNI where the CPU has it, 2 or -1: AMX tiles too for batches
 * of rows where the CPU and OS allow them); returns the path now in use (0, 1 or 2) */
int duplex_q16_set_isa(int isa) {
    q16_max_isa = isa < 0 || isa > 2 ? 2 : isa;
    q16_isa512 = -1;
    return q16_use512();
}

int duplex_q16_isa(void) { return q16_use512(); }

static inline Q512_TARGET double hsum512_epi32_exact(__m512i v) {
    __m512d s = _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(v)),
                              _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1)));
    return _mm512_reduce_add_pd(s);
}

#define Q512STEP(K_)                                                                                 \
    do {                                                                                             \
        __m512i wv[4];                                                                               \
        for (int r = 0; r < NR; ++r)                                                                 \
            wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * (int64_t)K + (K_)))); \
        for (int j = 0; j < MT; ++j) {                                                               \
            __m512i xv = _mm512_loadu_si512((const void*)(qx + j * kp + (K_)));                      \
            for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_dpwssd_epi32(acc[j][r], wv[r], xv);     \
        }                                                                                            \
    } while (0)

/* q16_tile's contract, 32 k per step */
static inline __attribute__((always_inline)) Q512_TARGET void q16_tile512(
        const int8_t* w, const uint16_t* S, const int16_t* qx, const float* dx, uint16_t* C, const uint16_t* R,
        int K, int64_t kp, int64_t N, int pf, const int MT, const int NR) {
    double tot[4][4] = {{0}};
    __m512i acc[4][4];
    int kfull = K & ~31;
    for (int k0 = 0; k0 < K; k0 += Q16_CHUNK) {
        int k1 = K - k0 <= Q16_CHUNK ? K : k0 + Q16_CHUNK;
        int k1f = k1 < kfull ? k1 : kfull;
        for (int j = 0; j < MT; ++j)
            for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_setzero_si512();
        int k = k0;
        for (; k + 64 <= k1f; k += 64) {
            if (pf)
                for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(w + NR * ((int64_t)K + k) + Q_PF + r * 64), _MM_HINT_T0);
            Q512STEP(k);
            Q512STEP(k + 32);
        }
        for (; k < k1f; k += 32) Q512STEP(k);
        if (k < k1) { /* the last k % 32 weights, zero-padded (qx is zero up to kp) */
            __m512i wv[4];
            for (int r = 0; r < NR; ++r) {
                int8_t tail[32] = {0};
                memcpy(tail, w + r * (int64_t)K + k, (size_t)(k1 - k));
                wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)tail));
            }
            for (int j = 0; j < MT; ++j) {
                __m512i xv = _mm512_loadu_si512((const void*)(qx + j * kp + k));
                for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_dpwssd_epi32(acc[j][r], wv[r], xv);
            }
        }
        for (int j = 0; j < MT; ++j)
            for (int r = 0; r < NR; ++r) tot[j][r] += hsum512_epi32_exact(acc[j][r]);
    }
    for (int j = 0; j < MT; ++j)
        for (int r = 0; r < NR; ++r) {
            uint16_t y = f32_to_bf16((float)(tot[j][r] * ((double)dx[j] * (double)bf16_to_f32(S[r]))));
            C[j * N + r] = R ? f32_to_bf16(bf16_to_f32(R[j * N + r]) + bf16_to_f32(y)) : y;
        }
}

#define Q512_TILE(MT_, NR_) \
    q16_tile512(B + (int64_t)n * K, S + n, qx + kp * m, dx + m, C + (int64_t)m * N + n, \
                R ? R + (int64_t)m * N + n : NULL, K, kp, N, m == m0, MT_, NR_)

#define Q512_ROWS(NR_)                                      \
    do {                                                    \
        int m = m0;                                         \
        for (; m + 4 <= m1; m += 4) Q512_TILE(4, NR_);      \
        switch (m1 - m) {                                   \
            case 3: Q512_TILE(3, NR_); break;               \
            case 2: Q512_TILE(2, NR_); break;               \
            case 1: Q512_TILE(1, NR_); break;               \
            default: break;                                 \
        }                                                   \
    } while (0)

/* q16_slice on AVX-512 VNNI: 4 weight rows per tile for every batch size */
static Q512_TARGET void q16_slice512(const int8_t* B, const uint16_t* S, uint16_t* C, const uint16_t* R, int n0,
                                     int n1, int M, int N, int K, const int16_t* qx, const float* dx, int64_t kp) {
    for (int m0 = 0; m0 < M; m0 += Q_MB) {
        int m1 = M - m0 < Q_MB ? M : m0 + Q_MB;
        int n = n0;
        for (; n + 4 <= n1; n += 4) Q512_ROWS(4);
        for (; n < n1; ++n) Q512_ROWS(1);
    }
}


#ifdef DUPLEX_HAVE_QAMX
/* ---- the same q16 products on AMX tiles, for batches of rows ---------------------------------
 * A batched tick (8 sessions' decode rows, a prefill piece) was compute-bound on the VNNI tiles: an
 * 8-row pass cost 2.4x a one-row pass that reads the same weights. AMX multiplies int8 tiles only,
 * so each int16 activation is split exactly into x = 256 hi + lo (hi signed, lo unsigned bytes):
 * tdpbssd(hi, w) and tdpbusd(lo, w) give two exact int32 dot products, and 256 hi + lo is the same
 * integer the VNNI tiles sum. The conversion after it is q16_tile512's, so the outputs are
 * bit-identical to both other paths: which one runs changes no result. A pass takes 32 weight rows
 * at a time, transposed once into the tiles' 4-byte groups (16x16 32-bit transposes) and reused by
 * every 16 activation rows. Tiles 0-3: C (16 x 16 int32: lo/hi x 2 blocks of 16 weight rows);
 * 4, 5: A (16 rows x 64 k, lo and hi); 6, 7: B (16 k-groups x 16 weight rows x 4). */
#define QAMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")))
#define QAMX_MIN_M 4 /* activation rows from which the tiles run: 2-3 rows measured slower than VNNI, 4 even */

/* The packed copy the tiles read: block (nb, kb) of weight rows 16 nb .. + 16 and k 64 kb .. + 64 at
 * byte (nb * kb_n + kb) * 1024, as 16 groups of 4 k each holding the 16 rows' 4 bytes (a B tile as
 * tileloadd reads it), zero past N and K. A second copy of the int8 weights, made once at load:
 * transposing on the fly cost more than streaming the weights (an 8-row pass no faster than VNNI). */
static inline int64_t q16_packed_bytes(int N, int K) { return (int64_t)((N + 15) / 16) * ((K + 63) / 64) * 1024; }

static QAMX_TARGET void q16_pack_amx(const int8_t* B, int N, int K, int8_t* out) {
    int kb_n = (K + 63) / 64, nb_n = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int nb = 0; nb < nb_n; ++nb) {
        int8_t tmp[16 * 64];
        for (int kb = 0; kb < kb_n; ++kb) {
            int bytes = K - kb * 64 < 64 ? K - kb * 64 : 64, rows = N - nb * 16 < 16 ? N - nb * 16 : 16;
            uint32_t* dst = (uint32_t*)(out + ((int64_t)nb * kb_n + kb) * 1024);
            const int8_t* src = B + (int64_t)nb * 16 * K + kb * 64;
            if (rows == 16) {
                duplex_transpose16x32(src, K, bytes, dst, 16);
            } else {
                memset(tmp, 0, sizeof tmp);
                for (int i = 0; i < rows; ++i) memcpy(tmp + i * 64, src + (int64_t)i * K, (size_t)bytes);
                duplex_transpose16x32(tmp, 64, 64, dst, 16);
            }
        }
    }
}

/* 16 outputs of row m: C = (R +) bf16((double)(256 hi + lo) * ((double)dx * (double)S)), exactly
 * q16_tile512's scalar arithmetic on 16 lanes (doubles for the product, the MXCSR's nearest for
 * the float conversion, c10's bf16 rounding) */
static inline QAMX_TARGET __m256i q16_round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                             _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

static inline QAMX_TARGET __m512 q16_bf16x16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline QAMX_TARGET void q16_convert16(const int32_t* lo, const int32_t* hi, double dxm, const uint16_t* S,
                                             uint16_t* C, const uint16_t* R) {
    __m512 sf = q16_bf16x16(S);
    __m512i l = _mm512_loadu_si512((const void*)lo), h = _mm512_loadu_si512((const void*)hi);
    __m512d d = _mm512_set1_pd(dxm), k256 = _mm512_set1_pd(256.0);
    __m512d t0 = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)), k256),
                               _mm512_cvtepi32_pd(_mm512_castsi512_si256(l)));
    __m512d t1 = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)), k256),
                               _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)));
    __m512d s0 = _mm512_mul_pd(d, _mm512_cvtps_pd(_mm512_castps512_ps256(sf)));
    __m512d s1 = _mm512_mul_pd(d, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sf), 1))));
    __m512 y = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_mul_pd(t0, s0))),
                                  _mm512_cvtpd_ps(_mm512_mul_pd(t1, s1)), 1);
    __m256i yb = q16_round_bf16(y);
    if (R) {
        __m512 yf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(yb), 16));
        yb = q16_round_bf16(_mm512_add_ps(q16_bf16x16(R), yf));
    }
    _mm256_storeu_si256((__m256i*)C, yb);
}

/* q16_slice's contract for weight rows n0 .. n1 (multiples of 16) from the packed copy Wp;
 * K <= 65536 keeps both int32 sums exact (|lo w| <= 255 * 127 per product). Returns 0, or -2
 * without memory (nothing written). */
static QAMX_TARGET int q16_slice_amx(const int8_t* Wp, const uint16_t* S, uint16_t* C, const uint16_t* R, int n0,
                                     int n1, int M, int N, int K, const int16_t* qx, const float* dx, int64_t kp) {
    int kb_n = (K + 63) / 64, mp = (M + 15) & ~15;
    int64_t k64 = (int64_t)kb_n * 64;
    uint8_t* lo = (uint8_t*)aligned_alloc(64, (size_t)(2 * mp * k64));
    int32_t* ct = (int32_t*)aligned_alloc(64, 4 * 256 * sizeof(int32_t));
    if (!lo || !ct) {
        free(lo);
        free(ct);
        return -2;
    }
    int8_t* hi = (int8_t*)(lo + mp * k64);
    for (int m = 0; m < mp; ++m) /* x = 256 hi + lo, exactly; padding rows and columns 0 */
        for (int64_t k = 0; k < k64; k += 32) {
            __m512i x = m < M && k < kp ? _mm512_loadu_si512((const void*)(qx + m * kp + k)) : _mm512_setzero_si512();
            _mm256_store_si256((__m256i*)(lo + m * k64 + k), _mm512_cvtepi16_epi8(_mm512_and_si512(x, _mm512_set1_epi16(0xFF))));
            _mm256_store_si256((__m256i*)(hi + m * k64 + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(x, 8)));
        }
    duplex_amx_config_16x64();
    for (int n = n0; n < n1; n += 32) {
        int two = n + 32 <= n1;
        const int8_t* b0 = Wp + (int64_t)(n / 16) * kb_n * 1024;
        const int8_t* b1 = b0 + (int64_t)kb_n * 1024;
        const int8_t* pf = b0 + (int64_t)2 * kb_n * 1024; /* the next pair's blocks, streamed ahead */
        const int8_t* pf_end = Wp + (int64_t)(n1 / 16) * kb_n * 1024;
        for (int g = 0; g < mp; g += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int kb = 0; kb < kb_n; ++kb) {
                if (g == 0)
                    for (int o = 0; o < 2048; o += 64) {
                        const int8_t* q = pf + (int64_t)kb * 2048 + o;
                        if (q < pf_end) _mm_prefetch((const char*)q, _MM_HINT_T0);
                    }
                _tile_loadd(4, lo + g * k64 + kb * 64, k64);
                _tile_loadd(5, hi + g * k64 + kb * 64, k64);
                _tile_loadd(6, b0 + (int64_t)kb * 1024, 64);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbssd(1, 5, 6);
                if (two) {
                    _tile_loadd(7, b1 + (int64_t)kb * 1024, 64);
                    _tile_dpbusd(2, 4, 7);
                    _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, ct, 64);
            _tile_stored(1, ct + 256, 64);
            _tile_stored(2, ct + 512, 64);
            _tile_stored(3, ct + 768, 64);
            for (int i = 0; i < 16 && g + i < M; ++i) {
                int m = g + i;
                for (int half = 0; half < 1 + two; ++half) {
                    int64_t o = (int64_t)m * N + n + 16 * half;
                    q16_convert16(ct + half * 512 + i * 16, ct + half * 512 + 256 + i * 16, (double)dx[m],
                                  S + n + 16 * half, C + o, R ? R + o : NULL);
                }
            }
        }
    }
    duplex_amx_release();
    free(lo);
    free(ct);
    return 0;
}
#endif

#else
static int q16_use512(void) { return 0; }
int duplex_q16_set_isa(int isa) { (void)isa; return 0; }
int duplex_q16_isa(void) { return 0; }
#endif

/* C [M, N] (+)= the quantized rows (qx [M, kp] int16, dx [M]) @ (B [N, K] * S).T for weight rows
 * n0..n1: tiles of Q16_NR weight rows against Q16_MT activation rows (4 weight rows for a single
 * activation row, the memory-bound case); each tile's weights stay in L1 across the passes. */
static void q16_slice(const int8_t* B, const int8_t* Wp, const uint16_t* S, uint16_t* C, const uint16_t* R, int n0,
                      int n1, int M, int N, int K, const int16_t* qx, const float* dx, int64_t kp) {
#ifdef DUPLEX_HAVE_QAMX
    if (Wp && q16_use512() >= 2 && M >= QAMX_MIN_M && K <= 65536) { /* 16-row blocks on the tiles */
        int a0 = (n0 + 15) & ~15, a1 = n1 & ~15;
        if (a0 < a1 && q16_slice_amx(Wp, S, C, R, a0, a1, M, N, K, qx, dx, kp) == 0) {
            if (a1 < n1) q16_slice(B, NULL, S, C, R, a1, n1, M, N, K, qx, dx, kp);
            n1 = a0; /* the rows before the first block, if any, below */
            if (n0 == n1) return;
        }
    }
#endif
#ifdef DUPLEX_HAVE_Q512
    if (q16_use512()) {
        q16_slice512(B, S, C, R, n0, n1, M, N, K, qx, dx, kp);
        return;
    }
#endif
    for (int m0 = 0; m0 < M; m0 += Q_MB) {
        int m1 = M - m0 < Q_MB ? M : m0 + Q_MB;
        int n = n0;
        if (m1 - m0 == 1) {
            const int m = m0;
            for (; n + 4 <= n1; n += 4) Q16_TILE(1, 4);
            for (; n < n1; ++n) Q16_TILE(1, 1);
            continue;
        }
        for (; n + Q16_NR <= n1; n += Q16_NR) Q16_ROWS(Q16_NR);
        for (; n < n1; ++n) Q16_ROWS(1);
    }
}

/* what a fused mat-vec applies to its input rows first (see prologue_row) */
enum { PRO_NONE = 0, PRO_RMSNORM = 1, PRO_SWIGLU = 2 };

/* bf16 round to nearest even of 8 floats, kept as floats (NaN -> the quiet NaN, as c10 does) */
static inline __m256 round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    __m256 r = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    return _mm256_blendv_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* expf for 8 lanes (Cephes' polynomial, as in avx_mathfun; ~1 ulp over the float range) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline void store_bf16x8(uint16_t* p, __m256 v) { /* v already rounded to bf16 values */
    __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(lo, hi));
}

/* the sum of a[0:K]^2 (bf16 values) in fp32, in the order both RMS norms here use */
static inline float sum_squares_bf16(const uint16_t* a, int K) {
    int k8 = K & ~7;
    __m256 acc = _mm256_setzero_ps();
    float ss = 0.0f;
    for (int k = 0; k < k8; k += 8) {
        __m256 v = load_bf16x8(a + k);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    for (int k = k8; k < K; ++k) {
        float v = bf16_to_f32(a[k]);
        ss += v * v;
    }
    return ss + hsum(acc);
}

/* The activation row a kernel multiplies, built from its inputs with the bf16 roundings of
 * transformers' modules (so the fused call equals the module sequence up to summation order):
 * PRO_NONE: a [K] itself; PRO_RMSNORM: LlamaRMSNorm(a [K]) with weight aux [K] and eps;
 * PRO_SWIGLU: silu(a[0:K]) * a[K:2K] (the gate and up halves of a fused gate/up output). */
static void prologue_row(int mode, const uint16_t* a, int K, const uint16_t* aux, float eps, uint16_t* act) {
    int k8 = K & ~7;
    if (mode == PRO_RMSNORM) {
        float r = 1.0f / sqrtf(sum_squares_bf16(a, K) / (float)K + eps);
        __m256 rv = _mm256_set1_ps(r);
        for (int k = 0; k < k8; k += 8)
            store_bf16x8(act + k, round_bf16(_mm256_mul_ps(round_bf16(_mm256_mul_ps(load_bf16x8(a + k), rv)),
                                                           load_bf16x8(aux + k))));
        for (int k = k8; k < K; ++k)
            act[k] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(a[k]) * r)) * bf16_to_f32(aux[k]));
    } else if (mode == PRO_SWIGLU) {
        const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
        for (int k = 0; k < k8; k += 8) {
            __m256 g = load_bf16x8(a + k);
            __m256 sg = round_bf16(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, neg)))));
            store_bf16x8(act + k, round_bf16(_mm256_mul_ps(sg, load_bf16x8(a + K + k))));
        }
        for (int k = k8; k < K; ++k) {
            float g = bf16_to_f32(a[k]);
            float sg = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            act[k] = f32_to_bf16(sg * bf16_to_f32(a[K + k]));
        }
    } else {
        memcpy(act, a, sizeof(uint16_t) * (size_t)K);
    }
}

static int q16_gemv(const uint16_t* A, int64_t lda, const int8_t* B, const int8_t* Wp, const uint16_t* S, uint16_t* C,
                    int M, int N, int K, int mode, const uint16_t* aux, float eps, const uint16_t* R);

int duplex_int8_q16_gemv_bf16(const uint16_t* A, const int8_t* B, const uint16_t* S, uint16_t* C,
                              int M, int N, int K) {
    return q16_gemv(A, K, B, NULL, S, C, M, N, K, PRO_NONE, NULL, 0.0f, NULL);
}

/* C [M, N] = (R [M, N] +) prologue(A [M, lda]) @ (B [N, K] * S).T, all bf16 but B (int8); C may be R
 * (in place). PRO_SWIGLU reads 2K columns of each row of A. Wp: B packed by duplex_q16_pack (the AMX
 * tiles' copy, for batches of rows), or NULL. */
int duplex_int8_q16_gemv_fused(const uint16_t* A, int64_t lda, const int8_t* B, const uint16_t* S, uint16_t* C,
                               int M, int N, int K, int mode, const uint16_t* aux, float eps, const uint16_t* R,
                               const int8_t* Wp) {
    return q16_gemv(A, lda, B, Wp, S, C, M, N, K, mode, aux, eps, R);
}

static int q16_gemv(const uint16_t* A, int64_t lda, const int8_t* B, const int8_t* Wp, const uint16_t* S, uint16_t* C,
                    int M, int N, int K, int mode, const uint16_t* aux, float eps, const uint16_t* R) {
    if (M < 1 || N < 1 || K < 1) return -1;
    int64_t kp = (int64_t)((K + 31) / 32) * 32;
    int threads = max_threads();
    int16_t* qxs = (int16_t*)aligned_alloc(32, (size_t)(2 * kp * M));
    float* dxs = (float*)malloc(sizeof(float) * (size_t)M);
    uint16_t* acts = mode == PRO_NONE ? NULL : (uint16_t*)malloc(sizeof(uint16_t) * (size_t)K * (size_t)threads);
    if (!qxs || !dxs || (mode != PRO_NONE && !acts)) {
        free(qxs);
        free(dxs);
        free(acts);
        return -2;
    }
#pragma omp parallel
    {
        uint16_t* act = acts ? acts + (int64_t)K * (thread_num() % threads) : NULL;
#pragma omp for schedule(static)
        for (int m = 0; m < M; ++m) { /* rows apart (see duplex_int8_q16_steps) */
            const uint16_t* row = A + (int64_t)m * lda;
            if (act) {
                prologue_row(mode, row, K, aux, eps, act);
                row = act;
            }
            dxs[m] = quantize_row_q16(row, K, kp, qxs + kp * m);
        } /* implicit barrier */
        /* contiguous slices of weight rows per thread: each thread streams its slice once, in order */
        int n0, n1;
        if (thread_slice(N, &n0, &n1)) q16_slice(B, Wp, S, C, R, n0, n1, M, N, K, qxs, dxs, kp);
    }
    free(acts);
    free(qxs);
    free(dxs);
    return 0;
}

/* ---- rotary embedding ----------------------------------------------------------------------- */

/* In place on t rows of `heads` vectors of size d (row i, head h at x + i * row_stride + h * d):
 * x = x * cos + rotate_half(x) * sin with cos/sin [t, d], every product and the sum rounded to bf16
 * as transformers' apply_rotary_pos_emb does on bf16 tensors (bit-identical to it). */
int duplex_rope_bf16(uint16_t* x, int t, int heads, int d, int64_t row_stride, const uint16_t* cos,
                     const uint16_t* sin) {
    if (d % 2 || d > 1024) return -1;
    int half = d / 2;
    float v[1024];
    for (int i = 0; i < t; ++i)
        for (int h = 0; h < heads; ++h) {
            uint16_t* p = x + (int64_t)i * row_stride + (int64_t)h * d;
            const uint16_t* c = cos + (int64_t)i * d;
            const uint16_t* sn = sin + (int64_t)i * d;
            for (int j = 0; j < d; ++j) v[j] = bf16_to_f32(p[j]);
            for (int j = 0; j < d; ++j) {
                float rot = j < half ? -v[j + half] : v[j - half];
                float a = bf16_to_f32(f32_to_bf16(v[j] * bf16_to_f32(c[j])));
                float b = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(sn[j])));
                p[j] = f32_to_bf16(a + b);
            }
        }
    return 0;
}

/* ---- Gemma 3's RMS norm (duplex.engine.gemma_decode) ---------------------------------------- */

/* For rows r < rows of d bf16 values (x + r * x_stride): transformers' Gemma3RMSNorm, whose
 * roundings differ from Llama's: h = x * 1/sqrt(mean(x^2) + eps) and h * scale in fp32 (scale = 1 +
 * weight, fp32; scale_rows rows of d, row r takes row r % scale_rows: q and k heads normed in one
 * call), rounded to bf16 once. With residual (+ r * r_stride): the bf16 sum residual + that, rounded
 * again (the decoder layer's residual add). out (+ r * out_stride) may be x or residual. */
int duplex_gemma_norm_bf16(const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t out_stride, int rows, int d,
                           const float* scale, int scale_rows, float eps, const uint16_t* residual, int64_t r_stride) {
    if (rows < 0 || d < 1 || scale_rows < 1) return -1;
    int d8 = d & ~7;
    for (int r = 0; r < rows; ++r) {
        const uint16_t* a = x + (int64_t)r * x_stride;
        uint16_t* o = out + (int64_t)r * out_stride;
        const uint16_t* res = residual ? residual + (int64_t)r * r_stride : NULL;
        const float* sc = scale + (int64_t)(r % scale_rows) * d;
        float rs = 1.0f / sqrtf(sum_squares_bf16(a, d) / (float)d + eps);
        __m256 rv = _mm256_set1_ps(rs);
        for (int k = 0; k < d8; k += 8) {
            __m256 h = round_bf16(_mm256_mul_ps(_mm256_mul_ps(load_bf16x8(a + k), rv), _mm256_loadu_ps(sc + k)));
            if (res) h = round_bf16(_mm256_add_ps(load_bf16x8(res + k), h));
            store_bf16x8(o + k, h);
        }
        for (int k = d8; k < d; ++k) {
            float h = bf16_to_f32(f32_to_bf16(bf16_to_f32(a[k]) * rs * sc[k]));
            o[k] = res ? f32_to_bf16(bf16_to_f32(res[k]) + h) : f32_to_bf16(h);
        }
    }
    return 0;
}

/* ---- a sequence of fused q16 mat-vecs in one parallel region -------------------------------- */

/* One step: c [M, n] = (r +) prologue(a [M, lda]) @ (w [n, k] * s).T, then, if rope_heads > 0,
 * duplex_rope_bf16 on the first rope_heads heads of each row of c (cos/sin [M, head_dim]). */
typedef struct {
    const uint16_t* a;
    int64_t lda;
    const int8_t* w;
    const uint16_t* s;
    uint16_t* c;
    const uint16_t* r;
    const uint16_t* aux;
    const uint16_t* cos;
    const uint16_t* sin;
    float eps;
    int n, k, mode, rope_heads, head_dim;
    const int8_t* wp; /* w packed by duplex_q16_pack, or NULL */
} q16_step;

/* Steps run in order, each reading what the ones before wrote (a barrier between them): a decode
 * layer's o (+ residual), gate/up (+ RMS norm), down (+ SwiGLU + residual) and the next layer's
 * q/k/v (+ RMS norm, rope) cost one call and one thread team instead of four. */
int duplex_int8_q16_steps(const q16_step* steps, int nsteps, int M) {
    int kmax = 0;
    for (int i = 0; i < nsteps; ++i) {
        if (steps[i].k < 1 || steps[i].n < 1 || steps[i].head_dim > 1024 || steps[i].head_dim % 2) return -1;
        if (steps[i].k > kmax) kmax = steps[i].k;
    }
    if (M < 1 || nsteps < 1) return -1;
    int64_t kpmax = (int64_t)((kmax + 31) / 32) * 32;
    int threads = max_threads();
    int16_t* qxs = (int16_t*)aligned_alloc(32, (size_t)(2 * kpmax * M));
    float* dxs = (float*)malloc(sizeof(float) * (size_t)M);
    uint16_t* acts = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)kmax * (size_t)threads); /* one row per thread */
    if (!qxs || !dxs || !acts) {
        free(qxs);
        free(dxs);
        free(acts);
        return -2;
    }
#pragma omp parallel
    {
        uint16_t* act = acts + (int64_t)kmax * (thread_num() % threads);
        for (int i = 0; i < nsteps; ++i) {
            const q16_step* st = steps + i;
            int K = st->k, N = st->n;
            int64_t kp = (int64_t)((K + 31) / 32) * 32;
            /* each row's prologue and quantization on its own: a many-token pass (eight questions at
             * once, ~150 rows) no longer has one thread do them while the others wait */
#pragma omp for schedule(static)
            for (int m = 0; m < M; ++m) {
                prologue_row(st->mode, st->a + (int64_t)m * st->lda, K, st->aux, st->eps, act);
                dxs[m] = quantize_row_q16(act, K, kp, qxs + kp * m);
            } /* implicit barrier: the quantized rows are ready */
            int n0, n1;
            if (thread_slice(N, &n0, &n1)) q16_slice(st->w, st->wp, st->s, st->c, st->r, n0, n1, M, N, K, qxs, dxs, kp);
            if (i + 1 < nsteps) { /* start this thread's next slice streaming while the team regroups */
                const q16_step* nx = steps + i + 1;
                int m0, m1;
                if (thread_slice(nx->n, &m0, &m1)) {
                    const char* p = (const char*)(nx->w + (int64_t)m0 * nx->k);
                    int64_t bytes = (int64_t)(m1 - m0) * nx->k;
                    for (int64_t off = 0; off < bytes && off < Q_PF_START; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
                }
            }
#pragma omp barrier
            if (st->rope_heads > 0) {
#pragma omp for schedule(static)
                for (int m = 0; m < M; ++m) /* rows apart: the same operations on each */
                    duplex_rope_bf16(st->c + (int64_t)m * N, 1, st->rope_heads, st->head_dim, N,
                                     st->cos + (int64_t)m * st->head_dim, st->sin + (int64_t)m * st->head_dim);
            }
        }
    }
    free(qxs);
    free(dxs);
    free(acts);
    return 0;
}

/* ---- the packed copy for the AMX tiles (see q16_slice_amx) ---------------------------------- */

/* bytes of the packed copy of an [N, K] weight, or 0 where the AMX tiles are not in use */
int64_t duplex_q16_packed_bytes(int N, int K) {
#ifdef DUPLEX_HAVE_QAMX
    if (q16_use512() >= 2 && N > 0 && K > 0 && K <= 65536) return q16_packed_bytes(N, K);
#endif
    (void)N;
    (void)K;
    return 0;
}

/* out [duplex_q16_packed_bytes(N, K)] = B [N, K] packed for the AMX tiles; -1 where they are off */
int duplex_q16_pack(const int8_t* B, int N, int K, int8_t* out) {
#ifdef DUPLEX_HAVE_QAMX
    if (duplex_q16_packed_bytes(N, K) > 0) {
        q16_pack_amx(B, N, K, out);
        return 0;
    }
#endif
    (void)B;
    (void)N;
    (void)K;
    (void)out;
    return -1;
}
