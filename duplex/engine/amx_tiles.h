/* What both C kernels (decode_attention.c, int8_gemv.c) share about AMX tiles and 16x16 transposes.
 * Included by each, compiled into each library (duplex.engine.int8_kernel.build_c_kernel hashes
 * this header with the source, so a change here rebuilds both). */
#ifndef DUPLEX_AMX_TILES_H
#define DUPLEX_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* AMX: its tile registers need the kernel's permission (Linux 5.16+) and gcc >= 11 / clang >= 12 */
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define DUPLEX_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DUPLEX_AMX_BF16_BIT 22
#define DUPLEX_AMX_INT8_BIT 25

/* the CPU has AMX tiles and the product `feature_bit` of CPUID.7.0:EDX, and the OS lets this
 * process use them */
static int duplex_amx_available(int feature_bit) {
    unsigned a, b, c, dx;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &dx) || !(dx & (1u << 24)) || !(dx & (1u << feature_bit))) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* this thread's tiles 0-7 as 16 rows x 64 bytes. Not _tile_loadconfig: gcc's macro names only the
 * first 8 bytes of the configuration as its input, so the stores of the rest can be dropped as dead
 * (a #GP at ldtilecfg) */
static inline void duplex_amx_config_16x64(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

static inline void duplex_amx_release(void) { __asm__ volatile("tilerelease" ::: "memory"); }
#endif

/* dst[i * ld + j] = the 32-bit word at byte 4 i of row j of a 16 x 64-byte block (row j at
 * src + j * stride bytes; bytes past `row_bytes` in each row read as 0) */
static inline __attribute__((target("avx512f,avx512bw"))) void duplex_transpose16x32(
        const void* src, int64_t stride, int row_bytes, uint32_t* dst, int64_t ld) {
    __m512i r[16], t[16];
    __mmask64 mk = row_bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << row_bytes) - 1);
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi8(mk, (const void*)((const char*)src + i * stride));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* each 128-bit lane now holds a 4 x 4 block transposed; two rounds of lane shuffles put the
     * blocks in place */
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512((void*)(dst + i * ld), r[i]);
}

#endif
