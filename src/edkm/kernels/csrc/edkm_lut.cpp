// edkm_lut: fast CPU kernels for LUT + b-bit-index weights (edkm).
//
// Weight W (rows, cols), element (r, c) = table[r / R, c / C, idx[r, c]], k = 2^bits entries per LUT.
//
// ---------------------------------------------------------------------------------------------
// Packed layout ("lane-interleaved", one 64-byte-aligned record per row)
// ---------------------------------------------------------------------------------------------
// Every row is packed on its own into `stride` bytes (stride a multiple of 64, so with torch's
// 64-byte-aligned allocations every row starts on a cache line and on a 512-bit load boundary).
// A row is a sequence of 64-byte blocks; each block holds one machine word for each of NL lanes:
//
//   bits 1..4 ("narrow"): lane width LW = 32 bits, NL = 16 lanes (block = 16 little-endian uint32)
//   bits 5..8 ("wide")  : lane width LW = 16 bits, NL = 32 lanes (block = 32 little-endian uint16)
//
// Column c belongs to lane l = c % NL, slot m = c / NL (nq = ceil(cols / NL) slots). Each lane is
// its own LSB-first bit stream running through word l of block 0, word l of block 1, ...:
// slot m occupies lane-stream bits [m*bits, (m+1)*bits), and lane-stream bit j is bit (j % LW) of
// word l of block (j / LW). A value may straddle two blocks. nd = ceil(nq*bits / LW) blocks per
// row. Padding (columns >= cols, bits past the last slot) is zero.
//
// Short last block (narrow only): the last block of a row holds tail = nq*bits - 32*(nd-1) used
// bits per lane; when tail <= 8 (16) its 16 words are stored as uint8 (uint16): TW = 8, 16 or 32
// bits, loaded with one zero-extending vpmovzx into 32-bit lanes. stride = 64 * (nd-1) + 2 * TW
// bytes: a 576-wide 3-bit row takes 224 bytes (216 of values) instead of 256, a 4-bit one 288
// (exact). Rows are then 16-byte aligned only (every load is unaligned-safe). Wide: TW = 16 always.
//
// Why: one 512-bit load gives 16 (32) lanes; a constant shift (or a 2-shift funnel when a value
// straddles two blocks) puts slot m's index in the low bits of every 32-bit (16-bit) lane, and
// the garbage above is ignored by the table permute (vpermps reads 4 index bits, vpermw/vpermt2w
// read 5/6; the tables are replicated so unused index bits do not matter). Decoding 16 weights at
// 1..4 bits therefore costs 1 shift + 1 vpermps, then one FMA per token: no masks, no gathers.
// For 5..8 bits the fp32 table is first checked to be exactly representable in fp16 (always true
// for edkm's fp16 LUTs in fp16/fp32 layers) and 32 weights are decoded with vpermw/vpermt2w
// chains (+ blends for 7/8 bits) on 16-bit lanes, then vcvtph2ps (exact); at 8 bits with AVX-512
// VBMI the same bytes are read as 64 byte lanes and looked up in byte planes of the fp16 table
// with vpermt2b (see the avx512vbmi section). Otherwise (tables not fp16-exact, column groups
// that do not cover whole slots, the scalar ISA) a generic exact path decodes a row to a buffer.
// Decoding rows (embedding, prefill tiles) uses AVX-512 or the generic path (no AVX2 decoder).
//
// ISA dispatch: AVX-512 (F+BW), AVX2+FMA and portable scalar code are compiled in one build
// (target pragmas / attributes per function region, no -march flags) and chosen at run time with
// __builtin_cpu_supports, or forced with isa = "avx512" | "avx2" | "scalar".
// ---------------------------------------------------------------------------------------------

#include "edkm_lut.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define EDKM_X86 1
#include <immintrin.h>
#else
#define EDKM_X86 0
#endif

namespace {

struct Layout {
  int bits, k, lw, nl;
  int tw;            // bits per word of the last block (== lw unless narrow with a short tail)
  int64_t nq, nd, tail_off, stride;
};

Layout layout_of(int bits, int64_t cols) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  Layout L;
  L.bits = bits;
  L.k = 1 << bits;
  L.lw = bits <= 4 ? 32 : 16;
  L.nl = 512 / L.lw;
  L.nq = (cols + L.nl - 1) / L.nl;
  L.nd = (L.nq * bits + L.lw - 1) / L.lw;
  L.tail_off = (L.nd - 1) * 64;
  const int64_t tail = L.nq * bits - L.lw * (L.nd - 1);
  L.tw = L.lw == 16 ? 16 : (tail <= 8 ? 8 : (tail <= 16 ? 16 : 32));
  L.stride = L.tail_off + L.nl * L.tw / 8;
  return L;
}

// Byte offset and width (bits) of word (block d, lane l) of a packed row.
inline std::pair<int64_t, int> word_place(const Layout& L, int64_t d, int64_t l) {
  if (d == L.nd - 1) return {L.tail_off + l * L.tw / 8, L.tw};
  return {d * 64 + l * L.lw / 8, L.lw};
}

// Word (block d, lane l) of a packed row, as a 64-bit value (zero past the row).
inline uint64_t word_at(const uint8_t* row, const Layout& L, int64_t d, int64_t l) {
  if (d >= L.nd) return 0;
  const auto [off, width] = word_place(L, d, l);
  uint32_t w = 0;
  std::memcpy(&w, row + off, width / 8);  // little-endian
  return w;
}

inline int value_at(const uint8_t* row, const Layout& L, int64_t c) {
  const int64_t l = c % L.nl, m = c / L.nl, pos = m * L.bits, d = pos / L.lw, o = pos % L.lw;
  uint64_t v = word_at(row, L, d, l) >> o;
  if (o + L.bits > L.lw) v |= word_at(row, L, d + 1, l) << (L.lw - o);
  return int(v & uint64_t(L.k - 1));
}

struct Args {
  const float* x;        // (T, cols) row-major, token stride xs
  int64_t xs;
  float* y;              // (T, rows) row-major, token stride ys
  int64_t ys;
  int T;
  const uint8_t* packed;
  const float* table;    // (Gr, Gc, k) fp32
  const uint16_t* t16;   // same in fp16 bits (wide paths only)
  int64_t rows, cols, R, C, Gc;
  Layout L;
};

inline const float* row_table(const Args& a, int64_t r) { return a.table + (r / a.R) * a.Gc * a.L.k; }

// ------------------------------------------------------------------ generic (any ISA, any layout)
void decode_row_generic(const Args& a, int64_t r, float* out) {
  const uint8_t* row = a.packed + r * a.L.stride;
  const float* tb = row_table(a, r);
  const int k = a.L.k;
  const bool grouped = a.C != a.cols;
  for (int64_t m = 0; m < a.L.nq; ++m) {
    for (int64_t l = 0; l < a.L.nl; ++l) {
      const int64_t c = m * a.L.nl + l;
      if (c >= a.cols) break;
      const int v = value_at(row, a.L, c);
      out[c] = tb[(grouped ? (c / a.C) * k : 0) + v];
    }
  }
}

void gemv_rows_generic(const Args& a, int64_t r0, int64_t r1) {
  std::vector<float> w(a.cols);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row_generic(a, r, w.data());
    for (int t = 0; t < a.T; ++t) {
      const float* x = a.x + t * a.xs;
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= a.cols; c += 8)
        for (int j = 0; j < 8; ++j) s[j] += w[c + j] * x[c + j];
      for (; c < a.cols; ++c) s[c & 7] += w[c] * x[c];
      a.y[t * a.ys + r] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    }
  }
}

// Whether the SIMD paths handle this grouping (a column group must cover whole slots).
inline bool simd_grouping_ok(const Args& a) {
  if (a.C == a.cols) return true;
  return a.C % a.L.nl == 0;
}

}  // namespace

#if EDKM_X86
// ============================================================================ AVX-512 (F + BW)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2,bmi2")
#endif
namespace avx512 {

template <class F, int... I>
inline __attribute__((always_inline)) void static_for_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline __attribute__((always_inline)) void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// Slot I (of a 32-slot group, B bits, 32-bit lanes) in the low bits of every lane.
template <int B, int I>
inline __attribute__((always_inline)) __m512i extract32(const __m512i* v) {
  constexpr int pos = I * B, d = pos / 32, o = pos % 32;
  if constexpr (o == 0) {
    return v[d];
  } else if constexpr (o + B <= 32) {
    return _mm512_srli_epi32(v[d], o);
  } else {
    return _mm512_or_si512(_mm512_srli_epi32(v[d], o), _mm512_slli_epi32(v[d + 1], 32 - o));
  }
}

// Slot I (of a 16-slot group, B bits, 16-bit lanes).
template <int B, int I>
inline __attribute__((always_inline)) __m512i extract16(const __m512i* v) {
  constexpr int pos = I * B, d = pos / 16, o = pos % 16;
  if constexpr (o == 0) {
    return v[d];
  } else if constexpr (o + B <= 16) {
    return _mm512_srli_epi16(v[d], o);
  } else {
    return _mm512_or_si512(_mm512_srli_epi16(v[d], o), _mm512_slli_epi16(v[d + 1], 16 - o));
  }
}

// 16-entry fp32 table register, entry i = tb[i % k] (k <= 16).
inline __attribute__((always_inline)) __m512 load_table16(const float* tb, int k) {
  const __m512i rep = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32(k - 1));
  const __mmask16 km = k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << k) - 1);
  return _mm512_permutexvar_ps(rep, _mm512_maskz_loadu_ps(km, tb));
}

// fp16 table registers (k/32 of them, k >= 32), words in order.
template <int B>
inline __attribute__((always_inline)) void load_table_w(const uint16_t* tb, __m512i* t) {
  constexpr int NT = (1 << B) / 32;
  for (int j = 0; j < NT; ++j) t[j] = _mm512_loadu_si512(tb + 32 * j);
}

template <int B>
inline __attribute__((always_inline)) __m512i lookup_w(__m512i idx, const __m512i* t) {
  if constexpr (B == 5) {
    return _mm512_permutexvar_epi16(idx, t[0]);
  } else if constexpr (B == 6) {
    return _mm512_permutex2var_epi16(t[0], idx, t[1]);
  } else if constexpr (B == 7) {
    const __m512i p0 = _mm512_permutex2var_epi16(t[0], idx, t[1]);
    const __m512i p1 = _mm512_permutex2var_epi16(t[2], idx, t[3]);
    const __mmask32 m6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x40));
    return _mm512_mask_blend_epi16(m6, p0, p1);
  } else {
    const __m512i p0 = _mm512_permutex2var_epi16(t[0], idx, t[1]);
    const __m512i p1 = _mm512_permutex2var_epi16(t[2], idx, t[3]);
    const __m512i p2 = _mm512_permutex2var_epi16(t[4], idx, t[5]);
    const __m512i p3 = _mm512_permutex2var_epi16(t[6], idx, t[7]);
    const __mmask32 m6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x40));
    const __mmask32 m7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x80));
    const __m512i a = _mm512_mask_blend_epi16(m6, p0, p1);
    const __m512i b = _mm512_mask_blend_epi16(m6, p2, p3);
    return _mm512_mask_blend_epi16(m7, a, b);
  }
}

inline __attribute__((always_inline)) __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1));
}

// Software prefetch of the row ~2 KiB ahead (the hardware prefetcher alone leaves DRAM latency exposed).
inline __attribute__((always_inline)) void prefetch_ahead(const Args& a, int64_t r) {
  const int64_t ahead = std::max<int64_t>(1, 2048 / a.L.stride);
  if (r + ahead < a.rows) {
    const char* p = reinterpret_cast<const char*>(a.packed + (r + ahead) * a.L.stride);
    for (int64_t j = 0; j < a.L.nd; ++j) _mm_prefetch(p + j * 64, _MM_HINT_T0);
  }
}

// Block d of a row as 16 (32) lanes: a short last block (TW < 32) zero-extended into 32-bit lanes.
inline __attribute__((always_inline)) __m512i load_block(const uint8_t* row, int64_t d, const Layout& L) {
  if (d >= L.nd) return _mm512_setzero_si512();
  if (d < L.nd - 1 || L.tw == L.lw) return _mm512_loadu_si512(row + d * 64);
  if (L.tw == 16) return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + L.tail_off)));
  return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + L.tail_off)));
}

inline __attribute__((always_inline)) void load_blocks(const uint8_t* row, int64_t first, int n, const Layout& L, __m512i* v) {
  for (int j = 0; j < n; ++j) v[j] = load_block(row, first + j, L);
}

// ---- narrow (1..4 bits): 16 weights per slot
template <int B, int T, bool GROUPED>
void gemv_narrow(const Args& a, int64_t r0, int64_t r1) {
  constexpr int NA = T == 1 ? 4 : (T == 2 ? 2 : 1);
  const int k = 1 << B;
  const int64_t cols = a.cols, nq = a.L.nq;
  const int64_t gfull = (cols / 16) / 32;  // groups of 32 slots with every column present
  const int64_t ngroups = (nq + 31) / 32;
  const float* loaded = nullptr;  // the table in `tbl` (rows of one LUT group share it: loaded once)
  __m512 tbl = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.packed + r * a.L.stride;
    prefetch_ahead(a, r);
    const float* tb = row_table(a, r);
    if (GROUPED || tb != loaded) { tbl = load_table16(tb, k); loaded = tb; }
    int64_t next_b = a.C;
    __m512 acc[T][NA];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < NA; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ngroups; ++g) {
      __m512i v[B];
      const bool full = g < gfull;
      if (full) {
        for (int j = 0; j < B; ++j) v[j] = _mm512_loadu_si512(row + (g * B + j) * 64);
        static_for<32>([&](auto ic) {
          constexpr int i = decltype(ic)::value;
          const int64_t c0 = (g * 32 + i) * 16;
          if (GROUPED && c0 == next_b) { tb += k; tbl = load_table16(tb, k); next_b += a.C; }
          const __m512 w = _mm512_permutexvar_ps(extract32<B, i>(v), tbl);
          for (int t = 0; t < T; ++t)
            acc[t][i % NA] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.x + t * a.xs + c0), acc[t][i % NA]);
        });
      } else {
        load_blocks(row, g * B, B, a.L, v);
        static_for<32>([&](auto ic) {
          constexpr int i = decltype(ic)::value;
          const int64_t m = g * 32 + i;
          if (m < nq) {
            const int64_t c0 = m * 16;
            if (c0 == next_b) { tb += k; tbl = load_table16(tb, k); next_b += a.C; }
            const __m512 w = _mm512_permutexvar_ps(extract32<B, i>(v), tbl);
            const __mmask16 mk = tail_mask(cols - c0);
            for (int t = 0; t < T; ++t)
              acc[t][i % NA] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, a.x + t * a.xs + c0), acc[t][i % NA]);
          }
        });
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512 s = acc[t][0];
      for (int j = 1; j < NA; ++j) s = _mm512_add_ps(s, acc[t][j]);
      a.y[t * a.ys + r] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---- wide (5..8 bits): 32 weights per slot, fp16 tables
template <int B, int T, bool GROUPED>
void gemv_wide(const Args& a, int64_t r0, int64_t r1) {
  constexpr int NA = T == 1 ? 2 : 1;
  constexpr int NT = (1 << B) / 32;
  const int k = 1 << B;
  const int64_t cols = a.cols, nq = a.L.nq;
  const int64_t gfull = (cols / 32) / 16;
  const int64_t ngroups = (nq + 15) / 16;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.packed + r * a.L.stride;
    prefetch_ahead(a, r);
    const uint16_t* tb = a.t16 + (r / a.R) * a.Gc * k;
    __m512i tw[NT];
    load_table_w<B>(tb, tw);
    int64_t next_b = a.C;
    __m512 acc[T][2 * NA];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 2 * NA; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ngroups; ++g) {
      __m512i v[B];
      const bool full = g < gfull;
      if (full) {
        for (int j = 0; j < B; ++j) v[j] = _mm512_loadu_si512(row + (g * B + j) * 64);
        static_for<16>([&](auto ic) {
          constexpr int i = decltype(ic)::value;
          const int64_t c0 = (g * 16 + i) * 32;
          if (GROUPED && c0 == next_b) { tb += k; load_table_w<B>(tb, tw); next_b += a.C; }
          const __m512i h = lookup_w<B>(extract16<B, i>(v), tw);
          const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
          const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
          constexpr int j = 2 * (i % NA);
          for (int t = 0; t < T; ++t) {
            acc[t][j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(a.x + t * a.xs + c0), acc[t][j]);
            acc[t][j + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(a.x + t * a.xs + c0 + 16), acc[t][j + 1]);
          }
        });
      } else {
        load_blocks(row, g * B, B, a.L, v);
        static_for<16>([&](auto ic) {
          constexpr int i = decltype(ic)::value;
          const int64_t m = g * 16 + i;
          if (m < nq) {
            const int64_t c0 = m * 32;
            if (c0 == next_b) { tb += k; load_table_w<B>(tb, tw); next_b += a.C; }
            const __m512i h = lookup_w<B>(extract16<B, i>(v), tw);
            const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            const __mmask16 ml = tail_mask(cols - c0), mh = tail_mask(cols - c0 - 16);
            constexpr int j = 2 * (i % NA);
            for (int t = 0; t < T; ++t) {
              acc[t][j] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(ml, a.x + t * a.xs + c0), acc[t][j]);
              acc[t][j + 1] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(mh, a.x + t * a.xs + c0 + 16), acc[t][j + 1]);
            }
          }
        });
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512 s = acc[t][0];
      for (int j = 1; j < 2 * NA; ++j) s = _mm512_add_ps(s, acc[t][j]);
      a.y[t * a.ys + r] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---- decode one row to fp32 (embedding lookups, prefill tiles)
template <int B>
void decode_narrow(const Args& a, int64_t r, float* out) {
  const int k = 1 << B;
  const int64_t cols = a.cols, nq = a.L.nq, ngroups = (nq + 31) / 32;
  const uint8_t* row = a.packed + r * a.L.stride;
  const float* tb = row_table(a, r);
  __m512 tbl = load_table16(tb, k);
  int64_t next_b = a.C;
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512i v[B];
    load_blocks(row, g * B, B, a.L, v);
    static_for<32>([&](auto ic) {
      constexpr int i = decltype(ic)::value;
      const int64_t m = g * 32 + i;
      if (m < nq) {
        const int64_t c0 = m * 16;
        if (c0 == next_b) { tb += k; tbl = load_table16(tb, k); next_b += a.C; }
        _mm512_mask_storeu_ps(out + c0, tail_mask(cols - c0), _mm512_permutexvar_ps(extract32<B, i>(v), tbl));
      }
    });
  }
}

template <int B>
void decode_wide(const Args& a, int64_t r, float* out) {
  const int k = 1 << B;
  constexpr int NT = (1 << B) / 32;
  const int64_t cols = a.cols, nq = a.L.nq, ngroups = (nq + 15) / 16;
  const uint8_t* row = a.packed + r * a.L.stride;
  const uint16_t* tb = a.t16 + (r / a.R) * a.Gc * k;
  __m512i tw[NT];
  load_table_w<B>(tb, tw);
  int64_t next_b = a.C;
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512i v[B];
    load_blocks(row, g * B, B, a.L, v);
    static_for<16>([&](auto ic) {
      constexpr int i = decltype(ic)::value;
      const int64_t m = g * 16 + i;
      if (m < nq) {
        const int64_t c0 = m * 32;
        if (c0 == next_b) { tb += k; load_table_w<B>(tb, tw); next_b += a.C; }
        const __m512i h = lookup_w<B>(extract16<B, i>(v), tw);
        _mm512_mask_storeu_ps(out + c0, tail_mask(cols - c0), _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
        _mm512_mask_storeu_ps(out + c0 + 16, tail_mask(cols - c0 - 16), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)));
      }
    });
  }
}

using GemvFn = void (*)(const Args&, int64_t, int64_t);
using DecFn = void (*)(const Args&, int64_t, float*);

template <int B, bool G, int... T>
constexpr std::array<GemvFn, sizeof...(T)> narrow_row(std::integer_sequence<int, T...>) { return {&gemv_narrow<B, T + 1, G>...}; }
template <int B, bool G, int... T>
constexpr std::array<GemvFn, sizeof...(T)> wide_row(std::integer_sequence<int, T...>) { return {&gemv_wide<B, T + 1, G>...}; }

constexpr int TMAX = 8;

template <bool G>
GemvFn pick_gemv_g(int bits, int T) {
  using S = std::make_integer_sequence<int, TMAX>;
  static const std::array<std::array<GemvFn, TMAX>, 8> tab = {
      narrow_row<1, G>(S{}), narrow_row<2, G>(S{}), narrow_row<3, G>(S{}), narrow_row<4, G>(S{}),
      wide_row<5, G>(S{}),   wide_row<6, G>(S{}),   wide_row<7, G>(S{}),   wide_row<8, G>(S{})};
  return tab[bits - 1][T - 1];
}

GemvFn pick_gemv(int bits, int T, bool grouped) { return grouped ? pick_gemv_g<true>(bits, T) : pick_gemv_g<false>(bits, T); }

DecFn pick_decode(int bits) {
  static const DecFn tab[8] = {&decode_narrow<1>, &decode_narrow<2>, &decode_narrow<3>, &decode_narrow<4>,
                               &decode_wide<5>,   &decode_wide<6>,   &decode_wide<7>,   &decode_wide<8>};
  return tab[bits - 1];
}

}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ============================================================================ AVX-512 VBMI, 8 bits
// The 8-bit layout seen as 64 byte lanes: byte p of block d is column (2d + (p & 1)) * 32 + (p >> 1)
// (word lane p >> 1, low byte = even slot). vpermt2b looks the 64 indices up in byte planes of the
// fp16 table (low bytes L[256], high bytes H[256], 2 permutes + 1 blend each), vpunpck{l,h}bw builds
// fp16 words, vcvtph2ps gives fp32. The fp32 outputs come in a fixed lane order, so x is permuted
// once per call into that order (xperm, zero-padded to nd * 64 columns): no masks, no tails.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,avx2,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,avx2,bmi2")
#endif
namespace avx512vbmi {

// Position in the block of element e of fp32 output vector v (see the function comment above).
inline int byte_of(int v, int e) {
  static const int base[4] = {0, 32, 8, 40};
  return base[v] + (e < 8 ? e : 16 + e - 8);
}

struct Byte8 {
  const uint8_t* planes;  // (groups, 512): L[256] then H[256]
  const float* xperm;     // (T, nd * 64)
  int64_t xps;
};

template <int T, bool GROUPED>
void gemv_byte8(const Args& a, const Byte8& b8, int64_t r0, int64_t r1) {
  constexpr int NA = T == 1 ? 4 : (T == 2 ? 2 : 1);
  const int64_t nd = a.L.nd;
  const uint8_t* last = nullptr;
  __m512i L0 = _mm512_setzero_si512(), L1 = L0, L2 = L0, L3 = L0, H0 = L0, H1 = L0, H2 = L0, H3 = L0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.packed + r * a.L.stride;
    const int64_t ahead = std::max<int64_t>(1, 2048 / a.L.stride);
    if (r + ahead < a.rows)
      for (int64_t j = 0; j < nd; ++j) _mm_prefetch(reinterpret_cast<const char*>(row + ahead * a.L.stride + j * 64), _MM_HINT_T0);
    const uint8_t* pl = b8.planes + (r / a.R) * a.Gc * 512;
    auto load_planes = [&](const uint8_t* q) {
      L0 = _mm512_loadu_si512(q); L1 = _mm512_loadu_si512(q + 64); L2 = _mm512_loadu_si512(q + 128); L3 = _mm512_loadu_si512(q + 192);
      H0 = _mm512_loadu_si512(q + 256); H1 = _mm512_loadu_si512(q + 320); H2 = _mm512_loadu_si512(q + 384); H3 = _mm512_loadu_si512(q + 448);
    };
    if (GROUPED || pl != last) { load_planes(pl); last = pl; }
    int64_t next_b = a.C;
    __m512 acc[T][NA];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < NA; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < nd; ++d) {
      if (GROUPED && d * 64 == next_b) { pl += 512; load_planes(pl); next_b += a.C; }
      const __m512i idx = _mm512_loadu_si512(row + d * 64);
      const __mmask64 hi7 = _mm512_movepi8_mask(idx);
      const __m512i lo = _mm512_mask_blend_epi8(hi7, _mm512_permutex2var_epi8(L0, idx, L1), _mm512_permutex2var_epi8(L2, idx, L3));
      const __m512i hi = _mm512_mask_blend_epi8(hi7, _mm512_permutex2var_epi8(H0, idx, H1), _mm512_permutex2var_epi8(H2, idx, H3));
      const __m512i u0 = _mm512_unpacklo_epi8(lo, hi), u1 = _mm512_unpackhi_epi8(lo, hi);
      const __m512 w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(u0));
      const __m512 w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(u0, 1));
      const __m512 w2 = _mm512_cvtph_ps(_mm512_castsi512_si256(u1));
      const __m512 w3 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(u1, 1));
      for (int t = 0; t < T; ++t) {
        const float* xp = b8.xperm + t * b8.xps + d * 64;
        acc[t][0 % NA] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[t][0 % NA]);
        acc[t][1 % NA] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[t][1 % NA]);
        acc[t][2 % NA] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + 32), acc[t][2 % NA]);
        acc[t][3 % NA] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + 48), acc[t][3 % NA]);
      }
    }
    for (int t = 0; t < T; ++t) {
      __m512 s = acc[t][0];
      for (int j = 1; j < NA; ++j) s = _mm512_add_ps(s, acc[t][j]);
      a.y[t * a.ys + r] = _mm512_reduce_add_ps(s);
    }
  }
}

using Fn = void (*)(const Args&, const Byte8&, int64_t, int64_t);
template <bool G, int... T>
constexpr std::array<Fn, sizeof...(T)> fns(std::integer_sequence<int, T...>) { return {&gemv_byte8<T + 1, G>...}; }
constexpr int TMAX = 8;
Fn pick(int T, bool grouped) {
  static const std::array<Fn, TMAX> g = fns<true>(std::make_integer_sequence<int, TMAX>{});
  static const std::array<Fn, TMAX> n = fns<false>(std::make_integer_sequence<int, TMAX>{});
  return grouped ? g[T - 1] : n[T - 1];
}

}  // namespace avx512vbmi
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ============================================================================ AVX2 + FMA
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
namespace avx2 {

template <class F, int... I>
inline __attribute__((always_inline)) void static_for_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline __attribute__((always_inline)) void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <int B, int I>
inline __attribute__((always_inline)) __m256i extract32(const __m256i* v) {
  constexpr int pos = I * B, d = pos / 32, o = pos % 32;
  if constexpr (o == 0) {
    return v[d];
  } else if constexpr (o + B <= 32) {
    return _mm256_srli_epi32(v[d], o);
  } else {
    return _mm256_or_si256(_mm256_srli_epi32(v[d], o), _mm256_slli_epi32(v[d + 1], 32 - o));
  }
}

// Two 8-entry halves of the replicated 16-entry table (entry i = tb[i % k]).
inline __attribute__((always_inline)) void load_table16(const float* tb, int k, __m256& lo, __m256& hi) {
  alignas(32) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = tb[i & (k - 1)];
  lo = _mm256_load_ps(t);
  hi = _mm256_load_ps(t + 8);
}

template <int B>
inline __attribute__((always_inline)) __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
  if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(lo, idx);
  } else {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
}

// Block d of a narrow row as lanes 0..7 (lo) and 8..15 (hi); a short last block zero-extended.
inline __attribute__((always_inline)) void load_block(const uint8_t* row, int64_t d, const Layout& L, __m256i& lo, __m256i& hi) {
  const uint8_t* p = row + d * 64;
  if (d >= L.nd) {
    lo = hi = _mm256_setzero_si256();
  } else if (d < L.nd - 1 || L.tw == 32) {
    lo = _mm256_loadu_si256((const __m256i*)p);
    hi = _mm256_loadu_si256((const __m256i*)(p + 32));
  } else if (L.tw == 16) {
    lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 16)));
  } else {
    lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
  }
}

inline __attribute__((always_inline)) __m256i lane_mask(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::max<int64_t>(0, std::min<int64_t>(n, 8)))), iota);
}

template <int B, int T>
void gemv_narrow(const Args& a, int64_t r0, int64_t r1) {
  constexpr int NA = T == 1 ? 2 : 1;
  const int k = 1 << B;
  const int64_t cols = a.cols, nq = a.L.nq;
  const int64_t gfull = (cols / 16) / 32, ngroups = (nq + 31) / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.packed + r * a.L.stride;
    const float* tb = row_table(a, r);
    __m256 tlo, thi;
    load_table16(tb, k, tlo, thi);
    int64_t next_b = a.C;
    __m256 acc[T][2 * NA];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 2 * NA; ++j) acc[t][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroups; ++g) {
      __m256i v0[B], v1[B];
      for (int j = 0; j < B; ++j) load_block(row, g * B + j, a.L, v0[j], v1[j]);
      const bool full = g < gfull;
      static_for<32>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        const int64_t m = g * 32 + i;
        if (full || m < nq) {
          const int64_t c0 = m * 16;
          if (c0 == next_b) { tb += k; load_table16(tb, k, tlo, thi); next_b += a.C; }
          const __m256 w0 = lookup<B>(extract32<B, i>(v0), tlo, thi);
          const __m256 w1 = lookup<B>(extract32<B, i>(v1), tlo, thi);
          constexpr int j = 2 * (i % NA);
          if (full) {
            for (int t = 0; t < T; ++t) {
              acc[t][j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a.x + t * a.xs + c0), acc[t][j]);
              acc[t][j + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(a.x + t * a.xs + c0 + 8), acc[t][j + 1]);
            }
          } else {
            const __m256i m0 = lane_mask(cols - c0), m1 = lane_mask(cols - c0 - 8);
            for (int t = 0; t < T; ++t) {
              acc[t][j] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(a.x + t * a.xs + c0, m0), acc[t][j]);
              acc[t][j + 1] = _mm256_fmadd_ps(w1, _mm256_maskload_ps(a.x + t * a.xs + c0 + 8, m1), acc[t][j + 1]);
            }
          }
        }
      });
    }
    for (int t = 0; t < T; ++t) {
      __m256 s = acc[t][0];
      for (int j = 1; j < 2 * NA; ++j) s = _mm256_add_ps(s, acc[t][j]);
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      q = _mm_add_ps(q, _mm_movehl_ps(q, q));
      q = _mm_add_ss(q, _mm_movehdup_ps(q));
      a.y[t * a.ys + r] = _mm_cvtss_f32(q);
    }
  }
}

// Wide (5..8 bits): 16-bit lanes, indices widened to 32 bits, fp32 table gathers (exact).
template <int B, int T>
void gemv_wide(const Args& a, int64_t r0, int64_t r1) {
  const int k = 1 << B;
  const int64_t cols = a.cols, nq = a.L.nq, nd = a.L.nd, ngroups = (nq + 15) / 16;
  const __m256i kmask = _mm256_set1_epi32(k - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.packed + r * a.L.stride;
    const float* tb = row_table(a, r);
    int64_t next_b = a.C;
    __m256 acc[T][4];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) acc[t][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroups; ++g) {
      static_for<16>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        constexpr int pos = i * B, d = pos / 16, o = pos % 16;
        const int64_t m = g * 16 + i;
        if (m < nq) {
          const int64_t c0 = m * 32;
          if (c0 == next_b) { tb += k; next_b += a.C; }
          const int64_t blk = g * B + d;
          for (int q = 0; q < 4; ++q) {
            const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(row + blk * 64 + q * 16)));
            __m256i idx = _mm256_srli_epi32(lo, o);
            if constexpr (o + B > 16) {
              const __m256i hi = blk + 1 < nd ? _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(row + (blk + 1) * 64 + q * 16)))
                                              : _mm256_setzero_si256();
              idx = _mm256_or_si256(idx, _mm256_slli_epi32(hi, 16 - o));
            }
            idx = _mm256_and_si256(idx, kmask);
            const __m256 w = _mm256_i32gather_ps(tb, idx, 4);
            const int64_t cq = c0 + q * 8;
            const __m256i mk = lane_mask(cols - cq);
            for (int t = 0; t < T; ++t)
              acc[t][q] = _mm256_fmadd_ps(w, _mm256_maskload_ps(a.x + t * a.xs + cq, mk), acc[t][q]);
          }
        }
      });
    }
    for (int t = 0; t < T; ++t) {
      __m256 s = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      q = _mm_add_ps(q, _mm_movehl_ps(q, q));
      q = _mm_add_ss(q, _mm_movehdup_ps(q));
      a.y[t * a.ys + r] = _mm_cvtss_f32(q);
    }
  }
}

using GemvFn = void (*)(const Args&, int64_t, int64_t);
constexpr int TMAX = 4;
template <int B, int... T>
constexpr std::array<GemvFn, sizeof...(T)> narrow_row(std::integer_sequence<int, T...>) { return {&gemv_narrow<B, T + 1>...}; }
template <int B, int... T>
constexpr std::array<GemvFn, sizeof...(T)> wide_row(std::integer_sequence<int, T...>) { return {&gemv_wide<B, T + 1>...}; }

GemvFn pick_gemv(int bits, int T) {
  static const std::array<std::array<GemvFn, TMAX>, 8> tab = {
      narrow_row<1>(std::make_integer_sequence<int, TMAX>{}), narrow_row<2>(std::make_integer_sequence<int, TMAX>{}),
      narrow_row<3>(std::make_integer_sequence<int, TMAX>{}), narrow_row<4>(std::make_integer_sequence<int, TMAX>{}),
      wide_row<5>(std::make_integer_sequence<int, TMAX>{}),   wide_row<6>(std::make_integer_sequence<int, TMAX>{}),
      wide_row<7>(std::make_integer_sequence<int, TMAX>{}),   wide_row<8>(std::make_integer_sequence<int, TMAX>{})};
  return tab[bits - 1][T - 1];
}

}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // EDKM_X86

// ============================================================================ dispatch + bindings
namespace {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

bool cpu_has(Isa isa) {
#if EDKM_X86
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == Isa::scalar;
#endif
}

bool cpu_vbmi() {
#if EDKM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

// The 8-bit byte-plane kernel (AVX-512 VBMI) is used for isa "auto" (when the CPU has VBMI) and "avx512vbmi";
// "avx512" means AVX-512 F+BW without it (the choice is an argument, never process state).
bool use_vbmi(const std::string& name) {
  const bool asked = name == "auto" || name.empty() || name == "avx512vbmi";
  return asked && cpu_vbmi();
}

Isa resolve_isa(const std::string& name) {
  if (name == "auto" || name.empty()) {
    if (cpu_has(Isa::avx512)) return Isa::avx512;
    if (cpu_has(Isa::avx2)) return Isa::avx2;
    return Isa::scalar;
  }
  Isa isa;
  if (name == "avx512vbmi") {
    TORCH_CHECK(cpu_vbmi(), "isa 'avx512vbmi' is not supported by this CPU or build");
    isa = Isa::avx512;
  } else if (name == "avx512") isa = Isa::avx512;
  else if (name == "avx2") isa = Isa::avx2;
  else if (name == "scalar") isa = Isa::scalar;
  else TORCH_CHECK(false, "unknown isa '", name, "' (auto, avx512vbmi, avx512, avx2, scalar)");
  TORCH_CHECK(cpu_has(isa), "isa '", name, "' is not supported by this CPU or build");
  return isa;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has(Isa::avx2)) out.push_back("avx2");
  if (cpu_has(Isa::avx512)) out.push_back("avx512");
  if (cpu_has(Isa::avx512) && cpu_vbmi()) out.push_back("avx512vbmi");
  return out;
}

Args make_args(const at::Tensor& packed, const at::Tensor& table, int64_t bits, int64_t rows, int64_t cols, int64_t R,
               int64_t C) {
  TORCH_CHECK(rows > 0 && cols > 0, "rows and cols must be positive");
  TORCH_CHECK(R >= 1 && rows % R == 0, "R must divide rows");
  TORCH_CHECK(C >= 1 && cols % C == 0, "C must divide cols");
  Args a{};
  a.L = layout_of(int(bits), cols);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == rows &&
                  packed.size(1) == a.L.stride && packed.is_contiguous(),
              "packed must be contiguous uint8 (rows, ", a.L.stride, ") from pack_rows");
  a.Gc = cols / C;
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == (rows / R) * a.Gc * a.L.k,
              "table must be contiguous fp32 (rows/R, cols/C, k)");
  a.packed = packed.data_ptr<uint8_t>();
  a.table = table.data_ptr<float>();
  a.rows = rows;
  a.cols = cols;
  a.R = R;
  a.C = C;
  return a;
}

// fp16 copy of the table if every entry converts exactly (wide SIMD paths), else undefined.
at::Tensor exact_fp16(const at::Tensor& table) {
  at::Tensor h = table.to(at::kHalf);
  if (!at::equal(h.to(at::kFloat), table)) return at::Tensor();
  return h;
}

int64_t grain_rows(int64_t cols, int64_t T) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols * T)); }

// OR value v (< 2^bits) into column c of a zeroed packed row.
inline void put_value(uint8_t* row, const Layout& L, int64_t c, uint64_t v) {
  const int64_t l = c % L.nl, m = c / L.nl, pos = m * L.bits, d = pos / L.lw, o = pos % L.lw;
  const uint64_t bitsv = v << o;  // <= 8 + 31 bits
  for (int64_t dd = d; dd <= d + 1 && dd < L.nd; ++dd) {
    const uint64_t part = (dd == d ? bitsv : (bitsv >> L.lw)) & ((uint64_t(1) << L.lw) - 1);
    if (!part) continue;
    const auto [off, width] = word_place(L, dd, l);
    uint32_t w = 0;
    std::memcpy(&w, row + off, width / 8);
    w |= uint32_t(part);
    std::memcpy(row + off, &w, width / 8);
  }
}

at::Tensor pack_rows(const at::Tensor& indices, int64_t bits) {
  TORCH_CHECK(indices.scalar_type() == at::kByte && indices.dim() == 2, "indices must be uint8 (rows, cols)");
  const at::Tensor idx = indices.contiguous();
  const int64_t rows = idx.size(0), cols = idx.size(1);
  const Layout L = layout_of(int(bits), cols);
  TORCH_CHECK(rows == 0 || cols == 0 || idx.max().item<int64_t>() < L.k, "indices must lie in [0, 2^bits)");
  at::Tensor out = at::zeros({rows, L.stride}, idx.options());
  const uint8_t* src = idx.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) put_value(dst + r * L.stride, L, c, src[r * cols + c]);
  });
  return out;
}

// Rows of the densely packed stream (value i at stream bits [bit_offset + i*bits, ...), LSB first, as
// edkm.export.pack writes) into `out` (rows, stride): the file's indices to the kernel's rows, no uint8 copy.
void pack_dense_into(at::Tensor out, const at::Tensor& stream, int64_t bit_offset, int64_t bits, int64_t cols) {
  const Layout L = layout_of(int(bits), cols);
  TORCH_CHECK(out.scalar_type() == at::kByte && out.dim() == 2 && out.size(1) == L.stride && out.is_contiguous(),
              "out must be contiguous uint8 (rows, ", L.stride, ")");
  TORCH_CHECK(stream.scalar_type() == at::kByte && stream.dim() == 1 && stream.is_contiguous(),
              "stream must be contiguous 1-D uint8");
  TORCH_CHECK(bit_offset >= 0 && bit_offset < 8, "bit_offset must lie in [0, 8)");
  const int64_t rows = out.size(0), nbytes = stream.numel();
  TORCH_CHECK(nbytes * 8 >= bit_offset + rows * cols * bits, "stream holds fewer than rows * cols values");
  const uint8_t* src = stream.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* row = dst + r * L.stride;
      std::memset(row, 0, L.stride);
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t pos = bit_offset + (r * cols + c) * bits, byte = pos >> 3;
        uint64_t v = src[byte];
        if (byte + 1 < nbytes) v |= uint64_t(src[byte + 1]) << 8;
        put_value(row, L, c, (v >> (pos & 7)) & mask);
      }
    }
  });
}

at::Tensor unpack_rows(const at::Tensor& packed, int64_t bits, int64_t cols) {
  const Layout L = layout_of(int(bits), cols);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) == L.stride,
              "packed must be uint8 (rows, ", L.stride, ")");
  const at::Tensor p = packed.contiguous();
  const int64_t rows = p.size(0);
  at::Tensor out = at::empty({rows, cols}, p.options());
  const uint8_t* src = p.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = uint8_t(value_at(src + r * L.stride, L, c));
  });
  return out;
}

int64_t packed_stride(int64_t bits, int64_t cols) { return layout_of(int(bits), cols).stride; }

// Which kernel gemv would use: "avx512", "avx2", "generic" (for tests / diagnostics).
std::string gemv_path(const at::Tensor& table, int64_t bits, int64_t rows, int64_t cols, int64_t R, int64_t C,
                      const std::string& isa_name) {
  const Isa isa = resolve_isa(isa_name);
  const Layout L = layout_of(int(bits), cols);
  const bool grouping = C == cols || C % L.nl == 0;
  if (isa == Isa::scalar || !grouping) return "generic";
  if (isa == Isa::avx512) {
    if (bits >= 5 && !exact_fp16(table.contiguous()).defined()) return "generic";
    if (bits == 8 && (C == cols || C % 64 == 0) && use_vbmi(isa_name)) return "avx512vbmi";
    return "avx512";
  }
  return "avx2";
}

at::Tensor gemv(const at::Tensor& x_, const at::Tensor& packed, const at::Tensor& table_, int64_t bits, int64_t rows,
                int64_t cols, int64_t R, int64_t C, const std::string& isa_name) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.dim() == 2 && x_.size(1) == cols, "x must be fp32 (T, cols)");
  const at::Tensor x = x_.contiguous();
  const at::Tensor table = table_.contiguous();
  Args a = make_args(packed, table, bits, rows, cols, R, C);
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, rows}, x.options());
  if (T == 0) return y;
  const Isa isa = resolve_isa(isa_name);
  at::Tensor t16;
  bool simd = isa != Isa::scalar && simd_grouping_ok(a);
#if EDKM_X86
  if (simd && isa == Isa::avx512 && bits >= 5) {
    t16 = exact_fp16(table);
    if (t16.defined()) a.t16 = reinterpret_cast<const uint16_t*>(t16.data_ptr<at::Half>());
    else simd = false;
  }
#endif
  if (!simd || !EDKM_X86) {
    a.x = x.data_ptr<float>(); a.xs = cols; a.y = y.data_ptr<float>(); a.ys = rows; a.T = int(T);
    at::parallel_for(0, rows, grain_rows(cols, T), [&](int64_t r0, int64_t r1) { gemv_rows_generic(a, r0, r1); });
    return y;
  }
#if EDKM_X86
  if (isa == Isa::avx512 && bits == 8 && (C == cols || C % 64 == 0) && use_vbmi(isa_name)) {
    // byte planes of the fp16 table and x permuted to the kernel's output lane order
    const at::Tensor w16 = t16.view(at::kShort).to(at::kInt).bitwise_and(0xFFFF).view({-1, 256});
    const at::Tensor planes = at::cat({w16.bitwise_and(0xFF), w16.bitwise_right_shift(8)}, 1).to(at::kByte).contiguous();
    const int64_t nd = a.L.nd;
    std::vector<int64_t> src(nd * 64);
    for (int64_t d = 0; d < nd; ++d)
      for (int v = 0; v < 4; ++v)
        for (int e = 0; e < 16; ++e) {
          const int p = avx512vbmi::byte_of(v, e);
          const int64_t c = (2 * d + (p & 1)) * 32 + (p >> 1);
          src[d * 64 + v * 16 + e] = c < cols ? c : cols;  // column `cols` is a zero column
        }
    const at::Tensor xz = at::cat({x, at::zeros({T, 1}, x.options())}, 1);
    const at::Tensor xperm = xz.index_select(1, at::tensor(src, at::kLong)).contiguous();
    for (int64_t t0 = 0; t0 < T; t0 += avx512vbmi::TMAX) {
      const int tb = int(std::min<int64_t>(avx512vbmi::TMAX, T - t0));
      Args b = a;
      b.y = y.data_ptr<float>() + t0 * rows; b.ys = rows; b.T = tb;
      avx512vbmi::Byte8 b8{planes.data_ptr<uint8_t>(), xperm.data_ptr<float>() + t0 * nd * 64, nd * 64};
      auto fn = avx512vbmi::pick(tb, C != cols);
      at::parallel_for(0, rows, grain_rows(cols, tb), [&](int64_t r0, int64_t r1) { fn(b, b8, r0, r1); });
    }
    return y;
  }
  const int tmax = isa == Isa::avx512 ? avx512::TMAX : avx2::TMAX;
  for (int64_t t0 = 0; t0 < T; t0 += tmax) {
    const int tb = int(std::min<int64_t>(tmax, T - t0));
    Args b = a;
    b.x = x.data_ptr<float>() + t0 * cols; b.xs = cols;
    b.y = y.data_ptr<float>() + t0 * rows; b.ys = rows;
    b.T = tb;
    auto fn = isa == Isa::avx512 ? avx512::pick_gemv(int(bits), tb, C != cols) : avx2::pick_gemv(int(bits), tb);
    at::parallel_for(0, rows, grain_rows(cols, tb), [&](int64_t r0, int64_t r1) { fn(b, r0, r1); });
  }
#endif
  return y;
}

// Decode rows [row_ids] (or a contiguous range) into out (n, cols).
void decode_into(const Args& a, Isa isa, const int64_t* ids, int64_t first, int64_t n, float* out) {
  bool simd = EDKM_X86 && isa == Isa::avx512 && simd_grouping_ok(a) && (a.L.bits <= 4 || a.t16 != nullptr);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / a.cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = ids ? ids[i] : first + i;
#if EDKM_X86
      if (simd) { avx512::pick_decode(a.L.bits)(a, r, out + i * a.cols); continue; }
#endif
      decode_row_generic(a, r, out + i * a.cols);
    }
  });
}

at::Tensor decode_rows(const at::Tensor& packed, const at::Tensor& table_, const at::Tensor& row_ids_, int64_t bits,
                       int64_t rows, int64_t cols, int64_t R, int64_t C, const std::string& isa_name) {
  const at::Tensor table = table_.contiguous();
  Args a = make_args(packed, table, bits, rows, cols, R, C);
  const Isa isa = resolve_isa(isa_name);
  const at::Tensor ids = row_ids_.to(at::kLong).contiguous().view(-1);
  const int64_t n = ids.numel();
  if (n) {
    TORCH_CHECK(ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < rows, "row ids must lie in [0, ", rows, ")");
  }
  at::Tensor out = at::empty({n, cols}, table.options());
  at::Tensor t16;
  if (isa == Isa::avx512 && bits >= 5) {
    t16 = exact_fp16(table);
    if (t16.defined()) a.t16 = reinterpret_cast<const uint16_t*>(t16.data_ptr<at::Half>());
  }
  decode_into(a, isa, ids.data_ptr<int64_t>(), 0, n, out.data_ptr<float>());
  return out;
}

// Prefill: y = x @ W^T by decoding tiles of `tile_rows` rows to fp32 and multiplying with at::mm.
at::Tensor linear_tiled(const at::Tensor& x_, const at::Tensor& packed, const at::Tensor& table_, int64_t bits,
                        int64_t rows, int64_t cols, int64_t R, int64_t C, int64_t tile_rows, const std::string& isa_name) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.dim() == 2 && x_.size(1) == cols, "x must be fp32 (T, cols)");
  const at::Tensor x = x_.contiguous();
  const at::Tensor table = table_.contiguous();
  Args a = make_args(packed, table, bits, rows, cols, R, C);
  const Isa isa = resolve_isa(isa_name);
  at::Tensor t16;
  if (isa == Isa::avx512 && bits >= 5) {
    t16 = exact_fp16(table);
    if (t16.defined()) a.t16 = reinterpret_cast<const uint16_t*>(t16.data_ptr<at::Half>());
  }
  if (tile_rows <= 0) tile_rows = std::max<int64_t>(16, (int64_t(1) << 20) / (cols * 4));  // ~1 MiB of fp32 rows
  tile_rows = std::min(tile_rows, rows);
  at::Tensor yt = at::empty({rows, x.size(0)}, x.options());  // y^T: row tiles are contiguous slices
  at::Tensor buf = at::empty({tile_rows, cols}, x.options());
  const at::Tensor xt = x.t();
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t n = std::min(tile_rows, rows - r0);
    decode_into(a, isa, nullptr, r0, n, buf.data_ptr<float>());
    at::Tensor out = yt.narrow(0, r0, n);
    at::mm_out(out, buf.narrow(0, 0, n), xt);
  }
  return yt.t().contiguous();
}

}  // namespace

at::Tensor edkm::packed_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& table, int64_t bits,
                             int64_t rows, int64_t cols, int64_t R, int64_t C, const std::string& isa) {
  return ::gemv(x, packed, table, bits, rows, cols, R, C, isa);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "edkm LUT kernels: packed b-bit weights decoded in registers (see the layout comment in the source)";
  m.def("pack_rows", &pack_rows, "pack uint8 indices (rows, cols) into the lane-interleaved layout", py::arg("indices"),
        py::arg("bits"));
  m.def("pack_dense_into", &pack_dense_into, "densely packed b-bit stream -> packed rows (in place)", py::arg("out"),
        py::arg("stream"), py::arg("bit_offset"), py::arg("bits"), py::arg("cols"));
  m.def("unpack_rows", &unpack_rows, "inverse of pack_rows", py::arg("packed"), py::arg("bits"), py::arg("cols"));
  m.def("packed_stride", &packed_stride, "bytes per packed row", py::arg("bits"), py::arg("cols"));
  m.def("gemv", &gemv, "y (T, rows) = x (T, cols) @ W^T, W decoded in registers", py::arg("x"), py::arg("packed"),
        py::arg("table"), py::arg("bits"), py::arg("rows"), py::arg("cols"), py::arg("R"), py::arg("C"),
        py::arg("isa") = "auto");
  m.def("decode_rows", &decode_rows, "decode the rows row_ids to fp32 (n, cols)", py::arg("packed"), py::arg("table"),
        py::arg("row_ids"), py::arg("bits"), py::arg("rows"), py::arg("cols"), py::arg("R"), py::arg("C"),
        py::arg("isa") = "auto");
  m.def("linear_tiled", &linear_tiled, "x @ W^T by decoded row tiles + at::mm (prefill)", py::arg("x"),
        py::arg("packed"), py::arg("table"), py::arg("bits"), py::arg("rows"), py::arg("cols"), py::arg("R"),
        py::arg("C"), py::arg("tile_rows") = 0, py::arg("isa") = "auto");
  m.def("gemv_path", &gemv_path, "which kernel gemv uses for these arguments", py::arg("table"), py::arg("bits"),
        py::arg("rows"), py::arg("cols"), py::arg("R"), py::arg("C"), py::arg("isa") = "auto");
  m.def("supported_isas", &supported_isas, "ISAs this CPU can run");
  edkm::register_step(m);
}
