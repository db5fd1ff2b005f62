// Matrix products on GGUF blocks with float32 activations (workbench/blocks.py builds and loads this file).
//
// y[t, r] = sum_i x[t, i] * w[r, i], where w[r, :] is row r of a GGUF matrix in its file's block type. Each
// 32-value group of a block is decoded in registers to exactly the float32 values gguf-py's dequantize gives
// (every product of an f16 scale with a small integer is exact in float32, and the one rounding add or
// subtract of a minimum is done by a fused multiply-add, which rounds once the same way), then multiplied
// into float32 accumulators. The result is the dequantized float32 product up to the order of summation.
//
// Portable C++ with GCC/Clang vector extensions (8 floats): -march=native turns them into AVX2/AVX-512
// instructions; elsewhere the compiler splits them. Rows are shared out over PyTorch's own intra-op threads
// (at::parallel_for), so this runs in the same OpenMP pool as every other op of the step.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));

struct W32 {
  v8 v[4];  // values 0-7, 8-15, 16-23, 24-31 of one 32-value group
};

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; the portable conversion below is a dozen
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline v8 splat(float f) { return v8{f, f, f, f, f, f, f, f}; }

inline v8 loadf(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
inline V load(const uint8_t* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// Each byte shifted right by s (0..7), as 16-bit lanes shift: the bits that cross into a byte from its
// neighbour are above the field every caller masks out.
inline u8x16 shr(u8x16 b, int s) { return (u8x16)((u16x8)b >> s); }
inline u8x32 shr(u8x32 b, int s) { return (u8x32)((u16x16)b >> s); }

// Bytes 8P..8P+7 of a 16- or 32-byte vector, widened to int32 lanes.
#if defined(__AVX2__)
template <int P>
inline i8v widen16(u8x16 b) {
  __m128i h = (__m128i)b;
  if (P & 1) h = _mm_srli_si128(h, 8);
  return (i8v)_mm256_cvtepu8_epi32(h);
}
template <int P>
inline i8v widen32(u8x32 b) {
  __m128i h = P < 2 ? _mm256_castsi256_si128((__m256i)b) : _mm256_extracti128_si256((__m256i)b, 1);
  if (P & 1) h = _mm_srli_si128(h, 8);
  return (i8v)_mm256_cvtepu8_epi32(h);
}
#else
template <int P, class V>
inline i8v widen_any(V b) {
  uint8_t t[sizeof(V)];
  std::memcpy(t, &b, sizeof t);
  u8x8 h;
  std::memcpy(&h, t + 8 * P, 8);
  return __builtin_convertvector(h, i8v);
}
template <int P>
inline i8v widen16(u8x16 b) { return widen_any<P>(b); }
template <int P>
inline i8v widen32(u8x32 b) { return widen_any<P>(b); }
#endif
inline v8 tof(i8v i) { return __builtin_convertvector(i, v8); }

const i8v LANE = {0, 1, 2, 3, 4, 5, 6, 7};

// The 32 nibble codes of a 32-value block whose 16 bytes hold values 0-15 in their low and 16-31 in their
// high nibbles (Q4_0, Q4_1, Q5_*, MXFP4), as int32 lanes.
struct Nibbles {
  i8v q[4];
  explicit Nibbles(const uint8_t* qs) {
    u8x16 b = load<u8x16>(qs), lo = b & 15, hi = shr(b, 4) & 15;
    q[0] = widen16<0>(lo), q[1] = widen16<1>(lo), q[2] = widen16<0>(hi), q[3] = widen16<1>(hi);
  }
};

// Q5_0/Q5_1: bit j of the little-endian u32 at qh is bit 4 of value j.
inline void add_high_bits(i8v q[4], const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  i8v hv = (i8v){} + (int32_t)h;
  for (int k = 0; k < 4; ++k) q[k] |= ((hv >> (LANE + 8 * k)) & 1) << 4;
}

// ---- the block types: BS values in TS bytes, decoded one 32-value group g (0 .. BS/32 - 1) at a time ----

struct Q4_0 {  // f16 d | 16 bytes of nibbles.  w = d * (q - 8)
  static constexpr int BS = 32, TS = 18;
  static W32 group(const uint8_t* b, int) {
    Nibbles n(b + 2);
    v8 d = splat(f16(b));
    return {{d * tof(n.q[0] - 8), d * tof(n.q[1] - 8), d * tof(n.q[2] - 8), d * tof(n.q[3] - 8)}};
  }
};

struct Q4_1 {  // f16 d | f16 m | 16 bytes of nibbles.  w = d * q + m
  static constexpr int BS = 32, TS = 20;
  static W32 group(const uint8_t* b, int) {
    Nibbles n(b + 4);
    v8 d = splat(f16(b)), m = splat(f16(b + 2));
    return {{d * tof(n.q[0]) + m, d * tof(n.q[1]) + m, d * tof(n.q[2]) + m, d * tof(n.q[3]) + m}};
  }
};

struct Q5_0 {  // f16 d | u32 qh | 16 bytes of nibbles.  w = d * (q - 16)
  static constexpr int BS = 32, TS = 22;
  static W32 group(const uint8_t* b, int) {
    Nibbles n(b + 6);
    add_high_bits(n.q, b + 2);
    v8 d = splat(f16(b));
    return {{d * tof(n.q[0] - 16), d * tof(n.q[1] - 16), d * tof(n.q[2] - 16), d * tof(n.q[3] - 16)}};
  }
};

struct Q5_1 {  // f16 d | f16 m | u32 qh | 16 bytes of nibbles.  w = d * q + m
  static constexpr int BS = 32, TS = 24;
  static W32 group(const uint8_t* b, int) {
    Nibbles n(b + 8);
    add_high_bits(n.q, b + 4);
    v8 d = splat(f16(b)), m = splat(f16(b + 2));
    return {{d * tof(n.q[0]) + m, d * tof(n.q[1]) + m, d * tof(n.q[2]) + m, d * tof(n.q[3]) + m}};
  }
};

struct Q8_0 {  // f16 d | 32 int8.  w = q * d
  static constexpr int BS = 32, TS = 34;
  static W32 group(const uint8_t* b, int) {
    typedef int8_t s8x8 __attribute__((vector_size(8)));
    v8 d = splat(f16(b));
    W32 w;
    for (int k = 0; k < 4; ++k) w.v[k] = tof(__builtin_convertvector(load<s8x8>(b + 2 + 8 * k), i8v)) * d;
    return w;
  }
};

struct MXFP4 {  // u8 e (E8M0) | 16 bytes of e2m1 nibbles.  w = kvalue(q) * 2^(e - 128)
  static constexpr int BS = 32, TS = 17;
  static W32 group(const uint8_t* b, int) {
    static const int8_t kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    uint32_t e = b[0], bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
    float d;
    std::memcpy(&d, &bits, 4);
    float w[32];
    for (int j = 0; j < 16; ++j) {
      w[j] = d * (float)kv[b[1 + j] & 15];
      w[j + 16] = d * (float)kv[b[1 + j] >> 4];
    }
    return {{loadf(w), loadf(w + 8), loadf(w + 16), loadf(w + 24)}};
  }
};

// Float parts of a fused matrix whose other parts are blocks (a file may store K as F16 beside a Q4_K Q).
struct F32 {
  static constexpr int BS = 32, TS = 128;
  static W32 group(const uint8_t* b, int) {
    const float* f = reinterpret_cast<const float*>(b);
    return {{loadf(f), loadf(f + 8), loadf(f + 16), loadf(f + 24)}};
  }
};
struct F16 {
  static constexpr int BS = 32, TS = 64;
  static W32 group(const uint8_t* b, int) {
    float w[32];
    for (int j = 0; j < 32; ++j) w[j] = f16(b + 2 * j);
    return {{loadf(w), loadf(w + 8), loadf(w + 16), loadf(w + 24)}};
  }
};
struct BF16 {
  static constexpr int BS = 32, TS = 64;
  static W32 group(const uint8_t* b, int) {
    float w[32];
    for (int j = 0; j < 32; ++j) {
      uint32_t bits = (uint32_t)(b[2 * j] | (b[2 * j + 1] << 8)) << 16;
      std::memcpy(&w[j], &bits, 4);
    }
    return {{loadf(w), loadf(w + 8), loadf(w + 16), loadf(w + 24)}};
  }
};

// Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins packed in 12 bytes.
inline void k_scale_min(const uint8_t* s, int g, int& sc, int& mn) {
  if (g < 4) {
    sc = s[g] & 63, mn = s[g + 4] & 63;
  } else {
    sc = (s[g + 4] & 15) | ((s[g - 4] >> 6) << 4);
    mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// The 32 nibbles of one Q4_K/Q5_K group: its 32-byte run's low (even g) or high (odd g) nibbles.
inline void k_nibbles(const uint8_t* qs, int g, i8v q[4]) {
  u8x32 b = load<u8x32>(qs + 32 * (g / 2));
  b = shr(b, 4 * (g & 1)) & 15;
  q[0] = widen32<0>(b), q[1] = widen32<1>(b), q[2] = widen32<2>(b), q[3] = widen32<3>(b);
}

struct Q4_K {  // f16 d | f16 dmin | 12 bytes scales+mins | 128 bytes of nibbles.  w = (d*sc) * q - dmin*mn
  static constexpr int BS = 256, TS = 144;
  static W32 group(const uint8_t* b, int g) {
    int sc, mn;
    k_scale_min(b + 4, g, sc, mn);
    i8v q[4];
    k_nibbles(b + 16, g, q);
    v8 dl = splat(f16(b) * (float)sc), ml = splat(f16(b + 2) * (float)mn);
    return {{dl * tof(q[0]) - ml, dl * tof(q[1]) - ml, dl * tof(q[2]) - ml, dl * tof(q[3]) - ml}};
  }
};

struct Q5_K {  // f16 d | f16 dmin | 12 bytes scales+mins | 32 bytes qh | 128 bytes of nibbles
  static constexpr int BS = 256, TS = 176;
  static W32 group(const uint8_t* b, int g) {
    int sc, mn;
    k_scale_min(b + 4, g, sc, mn);
    i8v q[4];
    k_nibbles(b + 48, g, q);
    u8x32 h = shr(load<u8x32>(b + 16), g) & 1;  // bit g of byte l: bit 4 of value l of group g
    q[0] |= widen32<0>(h) << 4, q[1] |= widen32<1>(h) << 4, q[2] |= widen32<2>(h) << 4, q[3] |= widen32<3>(h) << 4;
    v8 dl = splat(f16(b) * (float)sc), ml = splat(f16(b + 2) * (float)mn);
    return {{dl * tof(q[0]) - ml, dl * tof(q[1]) - ml, dl * tof(q[2]) - ml, dl * tof(q[3]) - ml}};
  }
};

// Q2_K/Q3_K/Q6_K's 2-bit fields: group g's 32 values are bits 2(g%4)..+1 of the 32 bytes at 32(g/4).
inline u8x32 two_bits(const uint8_t* qs, int g) { return shr(load<u8x32>(qs + 32 * (g / 4)), 2 * (g % 4)) & 3; }

struct Q2_K {  // 16 bytes scales (low nibble scale, high min; per 16 values) | 64 bytes q | f16 d | f16 dmin
  static constexpr int BS = 256, TS = 84;
  static W32 group(const uint8_t* b, int g) {
    u8x32 q = two_bits(b + 16, g);
    float d = f16(b + 80), dmin = f16(b + 82);
    uint8_t s0 = b[2 * g], s1 = b[2 * g + 1];
    v8 dl0 = splat(d * (float)(s0 & 15)), ml0 = splat(dmin * (float)(s0 >> 4));
    v8 dl1 = splat(d * (float)(s1 & 15)), ml1 = splat(dmin * (float)(s1 >> 4));
    return {{dl0 * tof(widen32<0>(q)) - ml0, dl0 * tof(widen32<1>(q)) - ml0,
             dl1 * tof(widen32<2>(q)) - ml1, dl1 * tof(widen32<3>(q)) - ml1}};
  }
};

inline int q3_scale(const uint8_t* p, int j) {  // Q3_K's 6-bit scale j of 16, minus 32
  int low = j < 8 ? p[j] & 15 : p[j - 8] >> 4;
  int high = (p[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (low | (high << 4)) - 32;
}

struct Q3_K {  // 32 bytes hmask | 64 bytes low 2 bits | 12 bytes 16 6-bit scales | f16 d.  w = (d*sc) * q
  static constexpr int BS = 256, TS = 110;
  static W32 group(const uint8_t* b, int g) {
    u8x32 q = two_bits(b + 32, g) | ((shr(load<u8x32>(b), g) & 1) << 2);  // hmask bit g of byte l: bit 2
    float d = f16(b + 108);
    v8 dl0 = splat(d * (float)q3_scale(b + 96, 2 * g)), dl1 = splat(d * (float)q3_scale(b + 96, 2 * g + 1));
    return {{dl0 * tof(widen32<0>(q) - 4), dl0 * tof(widen32<1>(q) - 4),
             dl1 * tof(widen32<2>(q) - 4), dl1 * tof(widen32<3>(q) - 4)}};
  }
};

struct Q6_K {  // 128 bytes ql | 64 bytes qh | 16 int8 scales (per 16 values) | f16 d.  w = (d*sc) * (q - 32)
  static constexpr int BS = 256, TS = 210;
  static W32 group(const uint8_t* b, int g) {
    int h = g / 4, k = g % 4;
    u8x32 lo = load<u8x32>(b + 64 * h + 32 * (k % 2));
    lo = shr(lo, 4 * (k / 2)) & 15;
    u8x32 q = lo | (two_bits(b + 128, g) << 4);
    float d = f16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    v8 dl0 = splat(d * (float)sc[2 * g]), dl1 = splat(d * (float)sc[2 * g + 1]);
    return {{dl0 * tof(widen32<0>(q) - 32), dl0 * tof(widen32<1>(q) - 32),
             dl1 * tof(widen32<2>(q) - 32), dl1 * tof(widen32<3>(q) - 32)}};
  }
};

// Ask for the bytes PREFETCH ahead of a block (n of them) now: a decode step streams every weight once from
// DRAM, and the hardware prefetchers alone left the kernel waiting (measured in a real decode: +20 % on SmolLM2
// with 8 KiB; 1 KiB gave +7 %, 16 KiB +19 %).
constexpr int64_t PREFETCH = 8192;
inline void prefetch_ahead(const uint8_t* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + PREFETCH + o, 0, 3);
}

inline float hsum(v8 v) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// AVX-512: each group's 32 weights as two 16-float registers. For the 4- and 5-bit types the weights are
// looked up: a table of the block's (or group's) 16 or 32 possible values, each computed as gguf-py computes
// it, indexed by the codes (vpermps / vpermt2ps read only the index bits they need).
#define WB_AVX512 1
const __m512 IOTA = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
const __m512 IOTA16 = _mm512_add_ps(IOTA, _mm512_set1_ps(16));

inline __m512i zext16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline __m512i sext16(__m128i v) { return _mm512_cvtepi8_epi32(v); }

// Values 0-15 / 16-31 of a 32-value block whose 16 code bytes hold them in low / high nibbles, looked up in t.
inline void nibble_lookup(const uint8_t* qs, __m512 t, __m512 w[2]) {
  __m512i q = zext16(qs);
  w[0] = _mm512_permutexvar_ps(q, t), w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
}
// The same with a fifth bit per value (bit j of the u32 at qh for value j), looked up in the 32 values t0|t1.
inline void nibble5_lookup(const uint8_t* qs, const uint8_t* qh, __m512 t0, __m512 t1, __m512 w[2]) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  const __m512i m15 = _mm512_set1_epi32(15), b4 = _mm512_set1_epi32(16);
  __m512i q = zext16(qs);
  __m512i lo = _mm512_mask_or_epi32(_mm512_and_si512(q, m15), (__mmask16)(h & 0xFFFF), _mm512_and_si512(q, m15), b4);
  __m512i hi = _mm512_mask_or_epi32(_mm512_srli_epi32(q, 4), (__mmask16)(h >> 16), _mm512_srli_epi32(q, 4), b4);
  w[0] = _mm512_permutex2var_ps(t0, lo, t1), w[1] = _mm512_permutex2var_ps(t0, hi, t1);
}

struct Z4_0 : Q4_0 {
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    float d = f16(b);
    nibble_lookup(b + 2, _mm512_fmadd_ps(_mm512_set1_ps(d), IOTA, _mm512_set1_ps(-8 * d)), w);  // d*(k-8), exact
  }
};
struct Z4_1 : Q4_1 {
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    nibble_lookup(b + 4, _mm512_fmadd_ps(_mm512_set1_ps(f16(b)), IOTA, _mm512_set1_ps(f16(b + 2))), w);  // d*k + m
  }
};
struct Z5_0 : Q5_0 {
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    __m512 d = _mm512_set1_ps(f16(b)), c = _mm512_set1_ps(-16 * f16(b));
    nibble5_lookup(b + 6, b + 2, _mm512_fmadd_ps(d, IOTA, c), _mm512_fmadd_ps(d, IOTA16, c), w);  // d*(k-16)
  }
};
struct Z5_1 : Q5_1 {
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    __m512 d = _mm512_set1_ps(f16(b)), m = _mm512_set1_ps(f16(b + 2));
    nibble5_lookup(b + 8, b + 4, _mm512_fmadd_ps(d, IOTA, m), _mm512_fmadd_ps(d, IOTA16, m), w);  // d*k + m
  }
};
struct Z8_0 : Q8_0 {
  // The block's codes as floats; its one scale multiplies the block's partial sum instead (d·q is exact, so
  // d·Σ q·x is Σ (d·q)·x up to rounding: one multiply fewer per 16 weights, on the heads' large matrices).
  static constexpr bool SCALED = true;
  static float scale(const uint8_t* b) { return f16(b); }
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    w[0] = _mm512_cvtepi32_ps(sext16(_mm_loadu_si128((const __m128i*)(b + 2))));
    w[1] = _mm512_cvtepi32_ps(sext16(_mm_loadu_si128((const __m128i*)(b + 18))));
  }
};
struct ZMXFP4 : MXFP4 {
  static void group512(const uint8_t* b, int, __m512 w[2]) {
    uint32_t e = b[0], bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
    float d;
    std::memcpy(&d, &bits, 4);
    const __m512 kv = _mm512_setr_ps(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    nibble_lookup(b + 1, _mm512_mul_ps(kv, _mm512_set1_ps(d)), w);
  }
};
struct Z4_K : Q4_K {
  static void group512(const uint8_t* b, int g, __m512 w[2]) {
    int sc, mn;
    k_scale_min(b + 4, g, sc, mn);
    __m512 t = _mm512_fmsub_ps(_mm512_set1_ps(f16(b) * (float)sc), IOTA, _mm512_set1_ps(f16(b + 2) * (float)mn));
    const uint8_t* run = b + 16 + 32 * (g / 2);
    __m512i q0 = zext16(run), q1 = zext16(run + 16);
    if (g & 1) q0 = _mm512_srli_epi32(q0, 4), q1 = _mm512_srli_epi32(q1, 4);
    w[0] = _mm512_permutexvar_ps(q0, t), w[1] = _mm512_permutexvar_ps(q1, t);
  }
};
struct Z5_K : Q5_K {
  static void group512(const uint8_t* b, int g, __m512 w[2]) {
    int sc, mn;
    k_scale_min(b + 4, g, sc, mn);
    __m512 dl = _mm512_set1_ps(f16(b) * (float)sc), ml = _mm512_set1_ps(f16(b + 2) * (float)mn);
    __m512 t0 = _mm512_fmsub_ps(dl, IOTA, ml), t1 = _mm512_fmsub_ps(dl, IOTA16, ml);
    const uint8_t* run = b + 48 + 32 * (g / 2);
    const __m512i m15 = _mm512_set1_epi32(15), b4 = _mm512_set1_epi32(16);
    const __m128i bit = _mm_set1_epi8((char)(1 << g));
    for (int h = 0; h < 2; ++h) {
      __m512i q = _mm512_and_si512(_mm512_srli_epi32(zext16(run + 16 * h), 4 * (g & 1)), m15);
      __mmask16 hb = _mm_test_epi8_mask(_mm_loadu_si128((const __m128i*)(b + 16 + 16 * h)), bit);
      w[h] = _mm512_permutex2var_ps(t0, _mm512_mask_or_epi32(q, hb, q, b4), t1);
    }
  }
};
struct Z6_K : Q6_K {
  static void group512(const uint8_t* b, int g, __m512 w[2]) {
    int h = g / 4, k = g % 4;
    u8x32 lo = shr(load<u8x32>(b + 64 * h + 32 * (k % 2)), 4 * (k / 2)) & 15;
    u8x32 q = (lo | (two_bits(b + 128, g) << 4)) - 32;  // int8 q - 32
    __m256i qi = (__m256i)q;
    float d = f16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    w[0] = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * g]), _mm512_cvtepi32_ps(sext16(_mm256_castsi256_si128(qi))));
    w[1] = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * g + 1]), _mm512_cvtepi32_ps(sext16(_mm256_extracti128_si256(qi, 1))));
  }
};

template <class Z, class = void> struct Scaled { static constexpr bool value = false; };
template <class Z> struct Scaled<Z, std::void_t<decltype(Z::SCALED)>> { static constexpr bool value = Z::SCALED; };

template <class Z, int TT>
void rows512(const uint8_t* w, int64_t row_bytes, int64_t n_in, const float* x, float* y, int64_t ys, int64_t r0, int64_t r1) {
  constexpr int G = Z::BS / 32;
  const int64_t n_blocks = n_in / Z::BS;
  int64_t r = r0;
  if constexpr (TT == 1 && !Scaled<Z>::value) {
    for (; r + 2 <= r1; r += 2) {
      const uint8_t* row0 = w + r * row_bytes;
      const uint8_t* row1 = row0 + row_bytes;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
      for (int64_t bi = 0; bi < n_blocks; ++bi) {
        prefetch_ahead(row0 + bi * Z::TS, Z::TS);
        prefetch_ahead(row1 + bi * Z::TS, Z::TS);
        for (int g = 0; g < G; ++g) {
          __m512 u[2], v[2];
          Z::group512(row0 + bi * Z::TS, g, u);
          Z::group512(row1 + bi * Z::TS, g, v);
          const float* xb = x + bi * Z::BS + 32 * g;
          const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
          a0 = _mm512_fmadd_ps(u[0], x0, a0), a1 = _mm512_fmadd_ps(u[1], x1, a1);
          b0 = _mm512_fmadd_ps(v[0], x0, b0), b1 = _mm512_fmadd_ps(v[1], x1, b1);
        }
      }
      y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      y[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    }
  }
  for (; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    __m512 acc[TT][2];
    for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const uint8_t* blk = row + bi * Z::TS;
      prefetch_ahead(blk, Z::TS);
      if constexpr (Scaled<Z>::value) {  // one 32-value group per block, its scale applied to the partial sum
        __m512 wv[2];
        Z::group512(blk, 0, wv);
        const __m512 d = _mm512_set1_ps(Z::scale(blk));
        const float* xb = x + bi * Z::BS;
        for (int t = 0; t < TT; ++t) {
          __m512 part = _mm512_mul_ps(wv[0], _mm512_loadu_ps(xb + t * n_in));
          part = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xb + t * n_in + 16), part);
          acc[t][bi & 1] = _mm512_fmadd_ps(d, part, acc[t][bi & 1]);
        }
        continue;
      }
      for (int g = 0; g < G; ++g) {
        __m512 wv[2];
        Z::group512(blk, g, wv);
        const float* xb = x + bi * Z::BS + 32 * g;
        for (int t = 0; t < TT; ++t) {
          acc[t][0] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xb + t * n_in), acc[t][0]);
          acc[t][1] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xb + t * n_in + 16), acc[t][1]);
        }
      }
    }
    for (int t = 0; t < TT; ++t) y[t * ys + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
  }
}
#endif

// Rows [r0, r1) of one matrix against TT tokens: x [TT, n_in] (row stride n_in), y[t * ys + r].
template <class D, int TT>
void rows(const uint8_t* w, int64_t row_bytes, int64_t n_in, const float* x, float* y, int64_t ys, int64_t r0, int64_t r1) {
  constexpr int G = D::BS / 32, NA = TT == 1 ? 4 : 2;
  const int64_t n_blocks = n_in / D::BS;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    v8 acc[TT][NA] = {};
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const uint8_t* blk = row + bi * D::TS;
      prefetch_ahead(blk, D::TS);
      for (int g = 0; g < G; ++g) {
        W32 q = D::group(blk, g);
        const float* xb = x + bi * D::BS + 32 * g;
        for (int t = 0; t < TT; ++t) {
          const float* xt = xb + t * n_in;
          for (int k = 0; k < 4; ++k) acc[t][k % NA] += q.v[k] * loadf(xt + 8 * k);
        }
      }
    }
    for (int t = 0; t < TT; ++t) {
      v8 s = acc[t][0];
      for (int a = 1; a < NA; ++a) s += acc[t][a];
      y[t * ys + r] = hsum(s);
    }
  }
}

// HasZ<D>::type: the AVX-512 form of block type D, where one is written (else the 8-lane form runs).
template <class D> struct HasZ { static constexpr bool value = false; };
#if defined(WB_AVX512)
#define WB_Z(D, Z) template <> struct HasZ<D> { static constexpr bool value = true; using type = Z; };
WB_Z(Q4_0, Z4_0) WB_Z(Q4_1, Z4_1) WB_Z(Q5_0, Z5_0) WB_Z(Q5_1, Z5_1) WB_Z(Q8_0, Z8_0) WB_Z(MXFP4, ZMXFP4)
WB_Z(Q4_K, Z4_K) WB_Z(Q5_K, Z5_K) WB_Z(Q6_K, Z6_K)
#undef WB_Z
#endif

template <class D, int TT>
void rows_best(const uint8_t* w, int64_t row_bytes, int64_t n_in, const float* x, float* y, int64_t ys, int64_t r0, int64_t r1) {
#if defined(WB_AVX512)
  if constexpr (HasZ<D>::value) return rows512<typename HasZ<D>::type, TT>(w, row_bytes, n_in, x, y, ys, r0, r1);
#endif
  rows<D, TT>(w, row_bytes, n_in, x, y, ys, r0, r1);
}

template <class D>
void rows_any(const uint8_t* w, int64_t row_bytes, int64_t n_in, const float* x, int64_t T, float* y, int64_t ys,
              int64_t r0, int64_t r1) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) rows_best<D, 4>(w, row_bytes, n_in, x + t * n_in, y + t * ys, ys, r0, r1);
  switch (T - t) {
    case 3: rows_best<D, 3>(w, row_bytes, n_in, x + t * n_in, y + t * ys, ys, r0, r1); break;
    case 2: rows_best<D, 2>(w, row_bytes, n_in, x + t * n_in, y + t * ys, ys, r0, r1); break;
    case 1: rows_best<D, 1>(w, row_bytes, n_in, x + t * n_in, y + t * ys, ys, r0, r1); break;
    default: break;
  }
}

using RowsFn = void (*)(const uint8_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);

struct TypeInfo {
  int block, bytes;
  RowsFn fn;
};

bool type_info(int64_t ggml_type, TypeInfo& info) {
  switch (ggml_type) {
#define WB_TYPE(ID, D) case ID: info = {D::BS, D::TS, rows_any<D>}; return true;
    WB_TYPE(2, Q4_0) WB_TYPE(3, Q4_1) WB_TYPE(6, Q5_0) WB_TYPE(7, Q5_1) WB_TYPE(8, Q8_0) WB_TYPE(10, Q2_K)
    WB_TYPE(11, Q3_K) WB_TYPE(12, Q4_K) WB_TYPE(13, Q5_K) WB_TYPE(14, Q6_K) WB_TYPE(39, MXFP4)
    WB_TYPE(0, F32) WB_TYPE(1, F16) WB_TYPE(30, BF16)
#undef WB_TYPE
    default: return false;
  }
}

// x [T, n_in] float32 times the matrices `parts` (uint8 [rows_i, bytes per row], GGUF types `types`) stacked
// along their rows → y [T, Σ rows_i] float32.
at::Tensor block_mm(const at::Tensor& x_in, at::TensorList parts, at::IntArrayRef types) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "block_mm takes float32 activations [T, in] on the CPU");
  TORCH_CHECK(parts.size() == types.size() && !parts.empty(), "block_mm takes one GGUF type per part");
  at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), n_in = x.size(1);
  std::vector<TypeInfo> info(parts.size());
  std::vector<int64_t> start(parts.size() + 1, 0);
  for (size_t p = 0; p < parts.size(); ++p) {
    TORCH_CHECK(type_info(types[p], info[p]), "block_mm has no kernel for GGUF type ", types[p]);
    const at::Tensor& w = parts[p];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(),
                "block_mm takes contiguous uint8 blocks [rows, bytes] on the CPU");
    TORCH_CHECK(n_in % info[p].block == 0 && w.size(1) == n_in / info[p].block * info[p].bytes,
                "block_mm: rows of ", w.size(1), " bytes do not hold ", n_in, " values of GGUF type ", types[p]);
    start[p + 1] = start[p] + w.size(0);
  }
  const int64_t N = start.back();
  at::Tensor y = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Chunks of whole rows; each thread takes a contiguous range of the stacked rows.
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (size_t p = 0; p < parts.size(); ++p) {
      int64_t a = std::max(r0, start[p]), b = std::min(r1, start[p + 1]);
      if (a >= b) continue;
      const uint8_t* w = parts[p].data_ptr<uint8_t>();
      info[p].fn(w, parts[p].size(1), n_in, xp, T, yp + start[p], N, a - start[p], b - start[p]);
    }
  });
  return y;
}

// ---- the small ops of a decode step, row by row (the ops below and decode_step share them) ----

// y = x / sqrt(mean(x²) + eps) · w over n values (y may be x).
inline void rms_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  v8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8 v = loadf(x + i);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(ss / (float)n + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * scale * w[j];
}

// One head of d values turned by a RoPE row (cos, sin [rot], sin's sign folded in as model.rope_table lays it
// out): o = x·cos + partner·sin, the partner of dim i being x[i ^ 1] (adjacent pairs) or x[(i + rot/2) mod rot]
// (neox); dims past rot are copied. o must not be x.
inline void rope_row(const float* x, const float* c, const float* s, float* o, int64_t d, int64_t rot, bool neox) {
  const int64_t half = rot / 2;
  if (neox) {
    for (int64_t i = 0; i < half; ++i) o[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int64_t i = half; i < rot; ++i) o[i] = x[i] * c[i] + x[i - half] * s[i];
  } else {
    for (int64_t i = 0; i < rot; i += 2) {
      o[i] = x[i] * c[i] + x[i + 1] * s[i];
      o[i + 1] = x[i + 1] * c[i + 1] + x[i] * s[i + 1];
    }
  }
  for (int64_t i = rot; i < d; ++i) o[i] = x[i];
}

// Softmax attention of one query row q [d] over S keys (rows ks1 apart) and values (rows vs1 apart, dv wide)
// → o [dv]; p is scratch for S scores. float32 scores, softmax and sums.
inline void attend_row(const float* q, const float* k, int64_t ks1, const float* v, int64_t vs1, int64_t S, int64_t d,
                       int64_t dv, float scale, float* p, float* o) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const float* kr = k + s * ks1;
    v8 acc = {};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) acc += loadf(q + i) * loadf(kr + i);
    float dot = hsum(acc);
    for (; i < d; ++i) dot += q[i] * kr[i];
    p[s] = dot * scale;
    mx = std::max(mx, p[s]);
  }
  float sum = 0;
  for (int64_t s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
  for (int64_t j = 0; j < dv; ++j) o[j] = 0;
  for (int64_t s = 0; s < S; ++s) {
    const float* vr = v + s * vs1;
    const float ps = p[s];
    for (int64_t j = 0; j < dv; ++j) o[j] += ps * vr[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < dv; ++j) o[j] *= inv;
}

// Query heads [h0, h1) of q [H, d] over a cache's first S positions (keys [Hkv, ≥S, d], values [Hkv, ≥S, dv],
// rows contiguous); query head h reads KV head h / (H / Hkv).
void attend_heads(const float* q, int64_t H, int64_t d, const at::Tensor& keys, const at::Tensor& values, int64_t S,
                  float scale, float* out) {
  const int64_t Hkv = keys.size(0), dv = values.size(2), group = H / Hkv;
  const float *kp = keys.data_ptr<float>(), *vp = values.data_ptr<float>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), vs0 = values.stride(0), vs1 = values.stride(1);
  auto body = [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h)
      attend_row(q + h * d, kp + (h / group) * ks0, ks1, vp + (h / group) * vs0, vs1, S, d, dv, scale, p.data(), out + h * dv);
  };
  if (H * S * d < 32768) body(0, H); else at::parallel_for(0, H, 1, body);
}

// RMSNorm over the last dim of float32 x (rows of n values) times weight [n].
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "rms_norm takes float32 tensors on the CPU");
  at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  const int64_t n = w.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, "rms_norm: the weight's length differs from the last dim");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rows = n ? x.numel() / n : 0;
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * n, wp, yp + r * n, n, (float)eps);
  };
  if (rows * n < 32768) body(0, rows); else at::parallel_for(0, rows, 1, body);
  return y;
}

// One query row's attention over a cache: q [H, d], keys [Hkv, S, d], values [Hkv, S, dv] (rows contiguous
// in d) → [H, dv].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "decode_attention takes float32 tensors");
  TORCH_CHECK(q_in.dim() == 2 && keys.dim() == 3 && values.dim() == 3 && keys.stride(2) == 1 && values.stride(2) == 1,
              "decode_attention takes q [H, d], keys [Hkv, S, d], values [Hkv, S, dv] with contiguous rows");
  at::Tensor q = q_in.contiguous();
  const int64_t H = q.size(0), d = q.size(1), Hkv = keys.size(0), S = keys.size(1);
  TORCH_CHECK(keys.size(2) == d && values.size(0) == Hkv && values.size(1) == S && Hkv > 0 && H % Hkv == 0,
              "decode_attention: shapes do not agree");
  at::Tensor out = at::empty({H, values.size(2)}, q.options());
  attend_heads(q.data_ptr<float>(), H, d, keys, values, S, (float)scale, out.data_ptr<float>());
  return out;
}

// RoPE of x [T, H, d]: each head's first rot dims turn by rows cos, sin [T, rot] (see rope_row).
at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool neox) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat &&
              x_in.dim() == 3 && cos_in.dim() == 2, "rope takes float32 x [T, H, d] and cos, sin [T, rot]");
  at::Tensor x = x_in.contiguous(), c = cos_in.contiguous(), sn = sin_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), d = x.size(2), rot = c.size(1);
  TORCH_CHECK(c.size(0) == T && sn.sizes() == c.sizes() && rot <= d && rot % 2 == 0, "rope: shapes do not agree");
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) rope_row(xp + (t * H + h) * d, cp + t * rot, sp + t * rot, op + (t * H + h) * d, d, rot, neox);
  return out;
}

// A plain decode step's attention, from the fused projection to the heads' outputs, in one call: qkv [1,
// (H + 2·Hkv)·d] → per-head QK-norm (when q_norm, k_norm are given) → RoPE (cos, sin [1, rot]) → K and V written
// into the layer's cache (keys, values [Hkv, capacity, d]) at position n_keys − 1 → attention over its first
// n_keys positions → [1, H·d]. The same arithmetic as model.attention's steps (rms_row, rope_row, attend_row),
// without the ~20 torch ops between them.
at::Tensor decode_step(const at::Tensor& qkv_in, const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                       double eps, const at::Tensor& cos_in, const at::Tensor& sin_in, bool neox, at::Tensor keys,
                       at::Tensor values, int64_t n_keys, int64_t n_heads, double scale) {
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat &&
              qkv_in.dim() == 2 && qkv_in.size(0) == 1 && keys.dim() == 3 && values.dim() == 3 && keys.stride(2) == 1 &&
              values.stride(2) == 1, "decode_step takes float32 qkv [1, n] and a layer's K, V cache [Hkv, capacity, d]");
  const int64_t Hkv = keys.size(0), d = keys.size(2), H = n_heads, rot = cos_in.size(-1);
  TORCH_CHECK(H % Hkv == 0 && qkv_in.size(1) == (H + 2 * Hkv) * d && values.size(2) == d && values.size(0) == Hkv &&
              0 < n_keys && n_keys <= keys.size(1) && n_keys <= values.size(1) && rot <= d && cos_in.numel() == rot &&
              sin_in.numel() == rot, "decode_step: shapes do not agree");
  at::Tensor qkv = qkv_in.contiguous(), c = cos_in.contiguous(), sn = sin_in.contiguous();
  const float *x = qkv.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  const float* qn = q_norm.has_value() ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm.has_value() ? k_norm->data_ptr<float>() : nullptr;
  TORCH_CHECK((!qn || q_norm->numel() == d) && (!kn || k_norm->numel() == d), "decode_step: QK-norm weights are per head dim");
  std::vector<float> q(H * d), normed(d);
  auto turn = [&](const float* head, const float* w, float* o) {
    if (w) {
      rms_row(head, w, normed.data(), d, (float)eps);
      head = normed.data();
    }
    rope_row(head, cp, sp, o, d, rot, neox);
  };
  const int64_t pos = n_keys - 1;
  float *kp = keys.data_ptr<float>(), *vp = values.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) turn(x + h * d, qn, q.data() + h * d);
  for (int64_t g = 0; g < Hkv; ++g) {
    turn(x + (H + g) * d, kn, kp + g * keys.stride(0) + pos * keys.stride(1));
    std::memcpy(vp + g * values.stride(0) + pos * values.stride(1), x + (H + Hkv + g) * d, d * sizeof(float));
  }
  at::Tensor out = at::empty({1, H * d}, qkv.options());
  attend_heads(q.data(), H, d, keys, values, n_keys, (float)scale, out.data_ptr<float>());
  return out;
}

at::Tensor block_mm_meta(const at::Tensor& x, at::TensorList parts, at::IntArrayRef types) {
  int64_t n = 0;
  for (const auto& w : parts) n += w.size(0);
  return at::empty({x.size(0), n}, x.options());
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) { return at::empty_like(x); }
at::Tensor decode_step_meta(const at::Tensor& qkv, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                            const at::Tensor&, const at::Tensor&, bool, at::Tensor keys, at::Tensor, int64_t, int64_t n_heads, double) {
  return at::empty({1, n_heads * keys.size(2)}, qkv.options());
}
at::Tensor rope_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, bool) {
  return at::empty(x.sizes(), x.options());
}
at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor& values, double) {
  return at::empty({q.size(0), values.size(2)}, q.options());
}

}  // namespace

TORCH_LIBRARY(workbench_blocks, m) {
  m.def("block_mm(Tensor x, Tensor[] parts, int[] types) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool neox) -> Tensor");
  m.def("decode_step(Tensor qkv, Tensor? q_norm, Tensor? k_norm, float eps, Tensor cos, Tensor sin, bool neox, "
        "Tensor(a!) keys, Tensor(b!) values, int n_keys, int n_heads, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(workbench_blocks, CPU, m) {
  m.impl("block_mm", block_mm);
  m.impl("rms_norm", rms_norm);
  m.impl("decode_attention", decode_attention);
  m.impl("rope", rope);
  m.impl("decode_step", decode_step);
}
TORCH_LIBRARY_IMPL(workbench_blocks, Meta, m) {
  m.impl("block_mm", block_mm_meta);
  m.impl("rms_norm", rms_norm_meta);
  m.impl("decode_attention", decode_attention_meta);
  m.impl("rope", rope_meta);
  m.impl("decode_step", decode_step_meta);
}
