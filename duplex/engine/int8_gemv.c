/* Int8 weight-only mat-vec for CPU decode, bit-identical to ATen's AVX2 _weight_int8pack_mm.
 *
 * C[m, n] = bf16( sum_k A[m, k] * (B[n, k] * S[n]) ), accumulated per 8-lane fp32 vector in k
 * order (step 8, one fma per step), then reduced with ATen's horizontal-add tree and rounded to
 * bf16 (nearest even). Every output uses the same operations in the same order as ATen's AVX2
 * kernel, so results are equal bit for bit; what differs is the schedule: A is converted to fp32
 * once per call instead of once per 4 weight rows, and one activation row is applied to 8 weight
 * rows at a time (8 independent fma chains instead of 4), which keeps the memory stream busy.
 * Built at first use by duplex.engine.int8_kernel (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
