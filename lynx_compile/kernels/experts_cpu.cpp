// Grouped MLP experts (gated, or an up projection alone) on CPU, built for decode: one call per
// MoE layer, every active expert's weights streamed from memory once, fp32 accumulation.
//
// Compiled at first use by Inductor's C++ code cache (experts_cpu_fused.py), with the vector ISA
// Inductor picks for this machine (at::vec: AVX2, AVX512, NEON, SVE, or scalar).
//
//   0. (serial)   counting sort of the T*k (token, slot) pairs by expert; ids are checked here;
//   1. gate_up    items = (active expert, block of I): gate and up columns for all the expert's
//                 rows, + bias, act(gate) * up (or act(up) without a gate), into
//                 A[pair sorted by expert, I] (fp32);
//   2. down       items = (active expert, block of H): A rows @ W_down, + bias, into Y[pair, H];
//   2b. norm      (with a post-expert norm) items = computed rows of Y: each normed in place;
//   3. sum        out[t] = sum_j w[t, j] * Y[(t, j)], j = 0..k-1 in order (the reference's order),
//                 cast to the output dtype.
// One OpenMP region, the phases separated by barriers; items are taken dynamically so a core
// slowed by another process does not hold the others at the barrier.
//
// Projections y = x @ M with M the logical [in, out] matrix of one expert, element (e, i, o) at
// base[e * se + i * si + o * so].
// - nn.Linear layout (si == 1), "dot" kernel: each output column is a dot product along a
//   contiguous weight row; tiles of NB weight rows x RB input rows of vector accumulators,
//   reduced across lanes at the end; K walked in chunks that keep the weight rows' chunk and the
//   input rows in L1 while every input row of the expert passes over them, the tiles of a chunk
//   asking for the next chunk's lines as they go (so that memory streams under the L1 passes).
// - transposed layouts (so == 1), "axpy" kernel: each input element scales a contiguous weight
//   row segment; KB weight rows at a time, used by every input row while in L1, into fp32 sums
//   held in a per-thread buffer.
// - bf16 weights and input on a CPU with AVX512-BF16: the dot kernel on vdpbf16ps (no widening;
//   the activations are rounded to bf16 before the down projection, as transformers' bf16
//   experts do).
// Either way the weights leave memory once however many rows the expert has, and a row's
// result never depends on which other rows are present (each sum runs in a fixed order).
// Tunables (LYNX_DOT_*, LYNX_AXPY_*) were set by benchmarks/experts_cpu.py on AVX2 and on AVX512.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace lynx_experts {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t V = fVec::size();

#ifndef LYNX_DOT_NB  // AVX512's 32 vector registers hold a wider tile than AVX2's 16
#if defined(CPU_CAPABILITY_AVX512)
#define LYNX_DOT_NB 8
#else
#define LYNX_DOT_NB 4
#endif
#endif
#ifndef LYNX_DOT_NB1
#define LYNX_DOT_NB1 8
#endif
#ifndef LYNX_DOT_RB
#define LYNX_DOT_RB 2
#endif
constexpr int DOT_NB = LYNX_DOT_NB;  // weight rows per dot tile
constexpr int DOT_RB = LYNX_DOT_RB;  // input rows per dot tile
constexpr int DOT_NB1 = LYNX_DOT_NB1;  // weight rows per dot tile for a single input row
#ifndef LYNX_AXPY_KB
#define LYNX_AXPY_KB 4
#endif
#ifndef LYNX_AXPY_RB
#define LYNX_AXPY_RB 2
#endif
constexpr int AXPY_KB = LYNX_AXPY_KB;  // weight rows per axpy step
constexpr int AXPY_RB = LYNX_AXPY_RB;  // input rows per axpy step
constexpr int64_t DOT_KC = 512;      // K chunk (elements) of the dot kernel
// Columns per item. Dot: I columns of gate_up (x2 weight rows: gate and up), H rows of down.
// Axpy: wide, so that each weight row segment an item streams is long (4 KB in fp32): every
// row starts a new page there, where hardware prefetchers stop.
constexpr int64_t DOT_GATE_BLOCK = 16, DOT_DOWN_BLOCK = 32;
#ifndef LYNX_AXPY_BLOCK
#define LYNX_AXPY_BLOCK 1024
#endif
constexpr int64_t AXPY_GATE_BLOCK = LYNX_AXPY_BLOCK, AXPY_DOWN_BLOCK = LYNX_AXPY_BLOCK;

enum Dtype : int64_t { F32 = 0, BF16 = 1, F16 = 2 };
enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3, SWIGLU_OAI = 4, SILU_CLAMPED = 5,
                     SWIGLU_SOFTCAPPED = 6, RELU2 = 7 };
// How gate and up sit in the first projection: two blocks of columns (or two matrices),
// alternating columns (GPT-OSS), or no gate at all (the projection is up).
enum GateForm : int64_t { HALVES = 0, INTERLEAVED = 1, UP_ONLY = 2 };
// The norm of each expert output row before its routing weight (experts_ref.POST_NORMS).
enum PostNorm : int64_t { NO_POST_NORM = 0, INPUT_SCALED_RMS = 1 };

template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

struct Mat {  // one projection's weights, in elements
  const void* base;
  int64_t se, si, so;
};

struct Scratch {  // a thread's accumulators, kept across calls
  std::vector<fVec> dot;
  std::vector<float> bf16_dot;
  std::vector<float> axpy;
  std::vector<float*> axpy_rows;
};

// ---- dot kernel (si == 1) -------------------------------------------------------------------

// The next K chunk of the n weight rows (after the last one: the first chunk of the n rows that
// follow, so apart), asked for at once while this one is computed by a single tile. A prefetch
// past the weights is harmless (it never faults).
template <typename T>
inline void prefetch_ahead(const T* const* w, int n, int64_t so, int64_t k1, int64_t kv, int64_t chunk) {
  constexpr int64_t line = 64 / sizeof(T);
  const int64_t shift = k1 < kv ? 0 : n * so, from = k1 < kv ? k1 : 0, to = std::min(kv, from + chunk);
  for (int i = 0; i < n; i++)
    for (int64_t k = from; k < to; k += line) __builtin_prefetch(w[i] + shift + k, 0, 0);
}

// Where an expert has rows for several tiles, each chunk's later tiles re-read it from L1, and
// memory sat idle under them when the next chunk was asked for at once (benchmarks/
// cpu_read_pattern.cpp, experts_cpu_ab.sh). Instead the chunk's tiles share the next chunk's rows
// out, each asking for one line per row and step: next[i] + k is the line of row i the step at k
// asks for (the next chunk of the row; after its last, the first chunk of the row n on, as in
// prefetch_ahead), and tile t of `tiles` takes rows [share(t), share(t + 1)).
template <typename T>
inline void next_chunk(const T* const* w, int n, int64_t so, int64_t k0, int64_t k1, int64_t kv, const T** next) {
  for (int i = 0; i < n; i++) next[i] = (k1 < kv ? w[i] + k1 : w[i] + n * so) - k0;
}

inline int share(int64_t t, int64_t tiles, int n) { return static_cast<int>(t * n / tiles); }

// pf, npf: the rows of the next chunk this tile asks for (next_chunk), one line each per 64 bytes.
template <typename T, int NB, int RB>
inline void dot_tile(const T* const* w, const float* const* x, int64_t k0, int64_t k1, fVec* acc,
                     const T* const* pf, int npf) {
  constexpr int64_t line = 64 / sizeof(T);  // a multiple of V; chunks start on one
  fVec a[RB][NB];
  for (int j = 0; j < RB; j++)
    for (int i = 0; i < NB; i++) a[j][i] = acc[j * NB + i];
  for (int64_t k = k0; k < k1; k += V) {
    fVec wv[NB];
    for (int i = 0; i < NB; i++) wv[i] = load_f<T>(w[i] + k);
    if (k % line == 0)
      for (int i = 0; i < npf; i++) __builtin_prefetch(pf[i] + k, 0, 3);
    for (int j = 0; j < RB; j++) {
      fVec xv = fVec::loadu(x[j] + k);
      for (int i = 0; i < NB; i++) a[j][i] = at::vec::fmadd(wv[i], xv, a[j][i]);
    }
  }
  for (int j = 0; j < RB; j++)
    for (int i = 0; i < NB; i++) acc[j * NB + i] = a[j][i];
}

// One tile of exactly `rows` (1..RB) input rows.
template <typename T, int NB, int RB>
inline void dot_rows(const T* const* w, const float* const* x, int64_t rows, int64_t k0, int64_t k1, fVec* acc,
                     const T* const* pf, int npf) {
  if constexpr (RB >= 1) {
    if (rows == RB) dot_tile<T, NB, RB>(w, x, k0, k1, acc, pf, npf);
    else dot_rows<T, NB, RB - 1>(w, x, rows, k0, k1, acc, pf, npf);
  }
}

// Lane sums of n accumulators into out[0..n), every lane summed in the same order whatever n
// is (so a row's result does not depend on the tile shape its expert's row count chose).
// AVX2: four at a time with horizontal adds, a remainder padded with zeros.
inline void reduce_lanes(const fVec* acc, int n, float* out) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  for (int i = 0; i < n; i += 4) {
    __m256 a[4];
    for (int j = 0; j < 4; j++) a[j] = i + j < n ? __m256(acc[i + j]) : _mm256_setzero_ps();
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    alignas(16) float sums[4];
    _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    for (int j = 0; j < 4 && i + j < n; j++) out[i + j] = sums[j];
  }
#else
  for (int i = 0; i < n; i++) out[i] = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc[i]);
#endif
}

// out[r * ldo + i] = dot(w[i], x[r]) for NB weight rows and R input rows of length K, in tiles
// of NB weight rows x RB input rows.
template <typename T, int NB, int RB>
void dot_group(const T* const* w, const float* const* x, int64_t R, int64_t K, std::vector<fVec>& acc_buf,
               float* out, int64_t ldo, int64_t so) {
  const int64_t kv = K - K % V;
  acc_buf.resize(std::max<size_t>(acc_buf.size(), R * NB));
  fVec* acc = acc_buf.data();
  std::fill(acc, acc + R * NB, fVec(0.f));
  const int64_t tiles = (R + RB - 1) / RB;
  for (int64_t k0 = 0; k0 < kv; k0 += DOT_KC) {
    const int64_t k1 = std::min(kv, k0 + DOT_KC);
    if (tiles == 1) {  // no L1 passes to hide memory under
      prefetch_ahead(w, NB, so, k1, kv, DOT_KC);
      dot_rows<T, NB, RB>(w, x, R, k0, k1, acc, nullptr, 0);
      continue;
    }
    const T* next[NB];
    next_chunk(w, NB, so, k0, k1, kv, next);
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t r = t * RB;
      const int lo = share(t, tiles, NB), hi = share(t + 1, tiles, NB);
      dot_rows<T, NB, RB>(w, x + r, std::min<int64_t>(RB, R - r), k0, k1, acc + r * NB, next + lo, hi - lo);
    }
  }
  // acc holds, for each tile of rows [r, r + rb), rb x NB accumulators in row-major order:
  // the accumulator of (row r + j, weight row i) is acc[(r + j) * NB + i] either way.
  float sums[NB];
  for (int64_t r = 0; r < R; r++) {
    reduce_lanes(acc + r * NB, NB, sums);
    for (int i = 0; i < NB; i++) {
      float s = sums[i];
      for (int64_t k = kv; k < K; k++) s += static_cast<float>(w[i][k]) * x[r][k];
      out[r * ldo + i] = s;
    }
  }
}

// Columns [c0, c0 + nc) of M (si == 1: column c is the contiguous weight row base + c * so).
template <typename T, int NB, int RB>
void dot_columns(const T* base, int64_t so, int64_t K, int64_t c0, int64_t nc, const float* const* x, int64_t R,
                 float* out, int64_t ldo, std::vector<fVec>& acc) {
  int64_t c = 0;
  for (; c + NB <= nc; c += NB) {
    const T* w[NB];
    for (int i = 0; i < NB; i++) w[i] = base + (c0 + c + i) * so;
    dot_group<T, NB, RB>(w, x, R, K, acc, out + c, ldo, so);
  }
  for (; c < nc; c++) {
    const T* w[1] = {base + (c0 + c) * so};
    dot_group<T, 1, 4>(w, x, R, K, acc, out + c, ldo, so);
  }
}

// ---- axpy kernel (so == 1) ------------------------------------------------------------------

// acc[j][c] += sum_q x[j][k + q] * w[(k + q) * si + c] for KB weight rows, RB input rows and the
// vectors of columns in [0, ncv * V): every weight vector is loaded once and used RB times; each
// row's sum runs over k in order, whatever RB is.
template <typename T, int KB, int RB>
inline void axpy_rows(const T* w, int64_t si, const float* const* x, int64_t k, int64_t ncv, float* const* acc) {
  fVec bx[RB][KB];
  for (int j = 0; j < RB; j++)
    for (int q = 0; q < KB; q++) bx[j][q] = fVec(x[j][k + q]);
  const T* rows[KB];
  for (int q = 0; q < KB; q++) rows[q] = w + (k + q) * si;
  for (int64_t v = 0; v < ncv; v++) {
    fVec wv[KB];
    for (int q = 0; q < KB; q++) wv[q] = load_f<T>(rows[q] + v * V);
    for (int j = 0; j < RB; j++) {
      fVec a = fVec::loadu(acc[j] + v * V);
      for (int q = 0; q < KB; q++) a = at::vec::fmadd(bx[j][q], wv[q], a);
      a.store(acc[j] + v * V);
    }
  }
}

// out[r * ldo + c] = sum_k x[r][k] * w[k * si + c] for c < nc (weights [K, nc] with unit column
// stride: transposed layouts). Streams each weight row segment once, AXPY_KB rows at a time,
// with the fp32 sums of all R rows in a per-thread buffer.
template <typename T>
void axpy_columns(const T* w, int64_t si, const float* const* x, int64_t R, int64_t K, int64_t nc,
                  Scratch& scratch, float* out, int64_t ldo) {
  const int64_t ncv = nc / V;  // full vectors of columns; the rest below, scalar
  const int64_t width = ncv * V;
  scratch.axpy.resize(std::max<size_t>(scratch.axpy.size(), R * width));
  std::fill(scratch.axpy.begin(), scratch.axpy.begin() + R * width, 0.f);
  float* acc = scratch.axpy.data();
  scratch.axpy_rows.resize(R);
  for (int64_t r = 0; r < R; r++) scratch.axpy_rows[r] = acc + r * width;
  float* const* rows = scratch.axpy_rows.data();
  // k outer: the KB weight row segments stay in L1 while every input row uses them
  auto step = [&](auto kb, int64_t k) {
    constexpr int KB = decltype(kb)::value;
    int64_t r = 0;
    for (; r + AXPY_RB <= R; r += AXPY_RB) axpy_rows<T, KB, AXPY_RB>(w, si, x + r, k, ncv, rows + r);
    for (; r < R; r++) axpy_rows<T, KB, 1>(w, si, x + r, k, ncv, rows + r);
  };
  int64_t k = 0;
  for (; k + AXPY_KB <= K; k += AXPY_KB) step(std::integral_constant<int, AXPY_KB>{}, k);
  for (; k < K; k++) step(std::integral_constant<int, 1>{}, k);
  for (int64_t r = 0; r < R; r++) {
    std::copy(acc + r * width, acc + (r + 1) * width, out + r * ldo);
    for (int64_t c = width; c < nc; c++) {  // column tail
      float s = 0.f;
      for (int64_t k = 0; k < K; k++) s += x[r][k] * static_cast<float>(w[k * si + c]);
      out[r * ldo + c] = s;
    }
  }
}

// ---- bf16 dot kernel (si == 1, bf16 weights and inputs, AVX512-BF16) -------------------------
//
// vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes in one instruction: no
// widening of the weights, so a bf16 expert with many rows stays at the memory limit. Each
// (row, weight row) sum runs in the same order whatever the tile shape, so a row's result still
// never depends on the other rows. Built with a target attribute (the rest of the file keeps
// Inductor's ISA); run only where the caller found the instructions (torch's CPU check).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LYNX_BF16_DOT 1
#define LYNX_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int64_t BV = 32;  // bf16 elements per vdpbf16ps
constexpr int64_t BF16_KC = 1024;  // K chunk: the dot kernel's in bytes
// Weight rows x input rows per tile: 8x2, and 4x6 from BF16_WIDE_ROWS rows per expert on (its
// fewer loads per vdpbf16ps pay where an expert's rows, not memory, bound the time).
constexpr int BF16_NB = 8, BF16_RB = 2, BF16_WIDE_NB = 4, BF16_WIDE_RB = 6, BF16_WIDE_ROWS = 5;

// pf, npf: the rows of the next chunk this tile asks for (next_chunk), one line each per step.
template <int NB, int RB>
LYNX_TARGET_BF16 inline void dpbf16_tile(const uint16_t* const* w, const uint16_t* const* x, int64_t k0, int64_t k1,
                                         float* acc, const uint16_t* const* pf, int npf) {
  __m512 a[RB][NB];
  for (int j = 0; j < RB; j++)
    for (int i = 0; i < NB; i++) a[j][i] = _mm512_loadu_ps(acc + (j * NB + i) * 16);
  for (int64_t k = k0; k < k1; k += BV) {
    __m512i wv[NB];
    for (int i = 0; i < NB; i++) wv[i] = _mm512_loadu_si512(w[i] + k);
    for (int i = 0; i < npf; i++) _mm_prefetch(reinterpret_cast<const char*>(pf[i] + k), _MM_HINT_T0);
    for (int j = 0; j < RB; j++) {
      const __m512i xv = _mm512_loadu_si512(x[j] + k);
      for (int i = 0; i < NB; i++) a[j][i] = _mm512_dpbf16_ps(a[j][i], (__m512bh)wv[i], (__m512bh)xv);
    }
  }
  for (int j = 0; j < RB; j++)
    for (int i = 0; i < NB; i++) _mm512_storeu_ps(acc + (j * NB + i) * 16, a[j][i]);
}

// One tile of exactly `rows` (1..RB) input rows.
template <int NB, int RB>
LYNX_TARGET_BF16 inline void dpbf16_rows(const uint16_t* const* w, const uint16_t* const* x, int64_t rows, int64_t k0,
                                         int64_t k1, float* acc, const uint16_t* const* pf, int npf) {
  if constexpr (RB >= 1) {
    if (rows == RB) dpbf16_tile<NB, RB>(w, x, k0, k1, acc, pf, npf);
    else dpbf16_rows<NB, RB - 1>(w, x, rows, k0, k1, acc, pf, npf);
  }
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dot_group for bf16 inputs: acc holds R * NB vectors of 16 fp32 lanes.
template <int NB, int RB>
LYNX_TARGET_BF16 void dpbf16_group(const uint16_t* const* w, const uint16_t* const* x, int64_t R, int64_t K,
                                   float* acc, float* out, int64_t ldo, int64_t so) {
  const int64_t kv = K - K % BV;
  std::fill(acc, acc + R * NB * 16, 0.f);
  const int64_t tiles = (R + RB - 1) / RB;
  for (int64_t k0 = 0; k0 < kv; k0 += BF16_KC) {
    const int64_t k1 = std::min(kv, k0 + BF16_KC);
    if (tiles == 1) {  // no L1 passes to hide memory under
      prefetch_ahead(w, NB, so, k1, kv, BF16_KC);
      dpbf16_rows<NB, RB>(w, x, R, k0, k1, acc, nullptr, 0);
      continue;
    }
    const uint16_t* next[NB];
    next_chunk(w, NB, so, k0, k1, kv, next);
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t r = t * RB;
      const int lo = share(t, tiles, NB), hi = share(t + 1, tiles, NB);
      dpbf16_rows<NB, RB>(w, x + r, std::min<int64_t>(RB, R - r), k0, k1, acc + r * NB * 16, next + lo, hi - lo);
    }
  }
  for (int64_t r = 0; r < R; r++)
    for (int i = 0; i < NB; i++) {
      float s = _mm512_reduce_add_ps(_mm512_loadu_ps(acc + (r * NB + i) * 16));
      for (int64_t k = kv; k < K; k++) s += bf16_to_float(w[i][k]) * bf16_to_float(x[r][k]);
      out[r * ldo + i] = s;
    }
}

template <int NB, int RB>
LYNX_TARGET_BF16 void dpbf16_columns(const uint16_t* base, int64_t so, int64_t K, int64_t c0, int64_t nc,
                                     const uint16_t* const* x, int64_t R, float* out, int64_t ldo, float* acc) {
  int64_t c = 0;
  for (; c + NB <= nc; c += NB) {
    const uint16_t* w[NB];
    for (int i = 0; i < NB; i++) w[i] = base + (c0 + c + i) * so;
    dpbf16_group<NB, RB>(w, x, R, K, acc, out + c, ldo, so);
  }
  for (; c < nc; c++) {
    const uint16_t* w[1] = {base + (c0 + c) * so};
    dpbf16_group<1, 4>(w, x, R, K, acc, out + c, ldo, so);
  }
}
#endif

// ---- one projection: out[r * ldo + c] = (x[r] @ M_e)[c0 + c], c < nc --------------------------

// ``xb``: the same rows in bf16 where the bf16 dot kernel runs (bf16 weights, si == 1), else null.
template <typename T>
void project(const Mat& m, int64_t e, int64_t K, int64_t c0, int64_t nc, const float* const* x, int64_t R,
             float* out, int64_t ldo, Scratch& acc, const uint16_t* const* xb = nullptr) {
  const T* base = static_cast<const T*>(m.base) + e * m.se;
#ifdef LYNX_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (xb != nullptr && m.si == 1) {
      acc.bf16_dot.resize(std::max<size_t>(acc.bf16_dot.size(), R * BF16_NB * 16));
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(base);
      float* scratch = acc.bf16_dot.data();
      if (R == 1) dpbf16_columns<BF16_NB, 1>(wb, m.so, K, c0, nc, xb, R, out, ldo, scratch);
      else if (R < BF16_WIDE_ROWS) dpbf16_columns<BF16_NB, BF16_RB>(wb, m.so, K, c0, nc, xb, R, out, ldo, scratch);
      else dpbf16_columns<BF16_WIDE_NB, BF16_WIDE_RB>(wb, m.so, K, c0, nc, xb, R, out, ldo, scratch);
      return;
    }
  }
#endif
  if (m.si == 1) {  // one row: more weight rows in flight; more rows: reuse each weight load
    if (R == 1) dot_columns<T, DOT_NB1, 1>(base, m.so, K, c0, nc, x, R, out, ldo, acc.dot);
    else dot_columns<T, DOT_NB, DOT_RB>(base, m.so, K, c0, nc, x, R, out, ldo, acc.dot);
    return;
  }
  axpy_columns<T>(base + c0, m.si, x, R, K, nc, acc, out, ldo);  // so == 1
}

// ---- activation ----------------------------------------------------------------------------

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

inline float unary(float x, int64_t act) {
  switch (act) {
    case SILU: return x / (1.f + std::exp(-x));
    case GELU: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    case GELU_TANH: {
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + std::tanh(inner));
    }
    case RELU: return x > 0.f ? x : 0.f;
    default: return x > 0.f ? x * x : 0.f;  // RELU2
  }
}

// The gated activations (experts_ref.gated_activation); p0, p1 are the activation_args.
inline float act_scalar(float g, float u, int64_t act, float p0, float p1) {
  switch (act) {
    case SWIGLU_OAI: {  // p0 = alpha, p1 = limit
      g = std::min(g, p1);
      u = std::min(std::max(u, -p1), p1);
      return (u + 1.f) * (g / (1.f + std::exp(-g * p0)));
    }
    case SILU_CLAMPED: {  // p0 = limit
      g = std::min(g, p0);
      u = std::min(std::max(u, -p0), p0);
      return g / (1.f + std::exp(-g)) * u;
    }
    case SWIGLU_SOFTCAPPED:  // p0, p1 = the gate's and up's softcaps
      return std::tanh(g / p0) * p0 * sigmoid(g) * (std::tanh(u / p1) * p1);
    default: return unary(g, act) * u;
  }
}

// gate[i] <- act(gate[i]) * up[i], or act(gate[i]) without up; gated silu (the common case)
// vectorised.
inline void activate(float* gate, const float* up, int64_t n, int64_t act, float p0, float p1) {
  int64_t i = 0;
  if (up == nullptr) {
    for (; i < n; i++) gate[i] = unary(gate[i], act);
    return;
  }
  if (act == SILU) {
    const fVec one(1.f);
    for (; i + V <= n; i += V) {
      fVec g = fVec::loadu(gate + i);
      fVec s = one / (one + g.neg().exp_u20());
      (g * s * fVec::loadu(up + i)).store(gate + i);
    }
  }
  for (; i < n; i++) gate[i] = act_scalar(gate[i], up[i], act, p0, p1);
}

// ---- post-expert norm --------------------------------------------------------------------

// x rounded to the dtype (bf16, fp16: round to nearest even, as torch's casts), back to float.
inline float round_to(float x, int64_t dtype) {
  if (dtype == BF16) return static_cast<float>(c10::BFloat16(x));
  if (dtype == F16) return static_cast<float>(c10::Half(x));
  return x;
}

// MuseSpark's input-scaled RMS norm of one row, in place (experts_ref.post_norm_rows): z = r(y * scale),
// y = r(z * rsqrt(mean(z^2) + eps)), r() rounding to the output dtype. The mean sums in double, nearer
// torch's pairwise fp32 sum than a serial float sum.
inline void input_scaled_rms(float* y, const float* scale, int64_t H, float eps, int64_t dtype) {
  double squares = 0.0;
  for (int64_t h = 0; h < H; h++) {
    y[h] = round_to(y[h] * scale[h], dtype);
    squares += static_cast<double>(y[h]) * y[h];
  }
  const float inv = 1.f / std::sqrt(static_cast<float>(squares / H) + eps);
  for (int64_t h = 0; h < H; h++) y[h] = round_to(y[h] * inv, dtype);
}

// ---- the layer -----------------------------------------------------------------------------

struct Args {
  int64_t T, H, I, k, E;
  const void* hidden;
  int64_t hidden_ld, hidden_dtype;
  const int64_t* ids;
  const float* routed;
  Mat gate, up, down;
  int64_t gate_off, up_off, gate_form;    // gate column j of M_gate is gate_off + j (or 2j: INTERLEAVED)
  const void* b_gate_up;                  // [E, 2I] over M_gate's columns, or null
  int64_t b_gate_up_se, b_gate_up_sc;
  const void* b_down;                     // [E, H], or null
  int64_t b_down_se, b_down_sc;
  int64_t act;
  float p0, p1;  // the activation's constants (activation_args), 0 where it has none
  const float* post_scale;                // [H] fp32: 1 + the norm's weight
  int64_t post_norm;
  float post_eps;
  void* out;
  int64_t out_dtype;
  int64_t threads;
  bool bf16_dot;  // the caller checked the CPU has AVX512-BF16 and asks for the bf16 dot kernel
};

template <typename T>
inline float bias_at(const void* b, int64_t se, int64_t sc, int64_t e, int64_t c) {
  return static_cast<float>(static_cast<const T*>(b)[e * se + c * sc]);
}

template <typename S>
void hidden_to_f32(const Args& a, int64_t t, float* dst) {
  const S* src = static_cast<const S*>(a.hidden) + t * a.hidden_ld;
  for (int64_t h = 0; h < a.H; h++) dst[h] = static_cast<float>(src[h]);
}

template <typename S>
void store_row(const float* src, void* out, int64_t t, int64_t H) {
  S* dst = static_cast<S*>(out) + t * H;
  for (int64_t h = 0; h < H; h++) dst[h] = static_cast<S>(src[h]);
}

struct Thread {  // per-thread scratch, kept across calls
  Scratch acc;
  std::vector<float> gate, up, row;
  std::vector<const float*> rows;
  std::vector<const uint16_t*> rows_bf16;
};

template <typename T>
void run(const Args& a) {
  const int64_t P = a.T * a.k, H = a.H, I = a.I;
  // 0. counting sort of the pairs by expert
  // thread_local: the scratch of the calling thread, kept across calls. The parallel region
  // below must reach it through these plain pointers (a thread_local named inside the region
  // would be each worker's own copy).
  thread_local std::vector<int64_t> count_v, order_v, slot_pos_v, active_v, start_v;
  thread_local std::vector<float> X_v, A_v, Y_v;
  thread_local std::vector<c10::BFloat16> Ab_v;
  // Id E is expert parallelism's sentinel (an expert on another rank): sorted last, computed
  // never, summed as nothing.
  count_v.assign(a.E + 2, 0);
  int64_t* count = count_v.data();
  for (int64_t p = 0; p < P; p++) {
    const int64_t e = a.ids[p];
    if (e < 0 || e > a.E)
      throw std::runtime_error("expert id " + std::to_string(e) + " out of range [0, " + std::to_string(a.E) + "]");
    count[e + 1]++;
  }
  active_v.clear();
  start_v.clear();
  for (int64_t e = 0; e < a.E; e++) {
    if (count[e + 1]) {
      active_v.push_back(e);
      start_v.push_back(count[e]);
    }
    count[e + 1] += count[e];
  }
  start_v.push_back(count[a.E]);  // end of the last group: the sentinels follow
  order_v.resize(P);
  slot_pos_v.resize(P);
  int64_t* order = order_v.data();
  int64_t* slot_pos = slot_pos_v.data();
  for (int64_t p = 0; p < P; p++) {
    const int64_t pos = count[a.ids[p]]++;
    order[pos] = p;
    slot_pos[p] = pos;
  }
  const int64_t* active = active_v.data();
  const int64_t* start = start_v.data();
  const int64_t num_active = static_cast<int64_t>(active_v.size());

  // The bf16 dot kernel: gate_up reads the bf16 hidden rows as they are; down reads the
  // activations rounded to bf16 (transformers' bf16 experts round them there too).
  bool bf16_dot = false;
#ifdef LYNX_BF16_DOT
  bf16_dot = a.bf16_dot && std::is_same_v<T, c10::BFloat16> && a.hidden_dtype == BF16;
#endif
  const bool gate_bf16 = bf16_dot && a.gate.si == 1 && a.up.si == 1, down_bf16 = bf16_dot && a.down.si == 1;
  if (down_bf16) Ab_v.resize(P * I);
  c10::BFloat16* Ab = Ab_v.data();
  const uint16_t* hidden_bf16 = static_cast<const uint16_t*>(a.hidden);
  const bool direct_x = a.hidden_dtype == F32;
  const bool convert_x = !direct_x && !gate_bf16;  // the fp32 copy of the hidden rows the fp32 kernels read
  if (convert_x) X_v.resize(a.T * H);
  A_v.resize(P * I);
  Y_v.resize(P * H);
  float* X = X_v.data();
  float* A = A_v.data();
  float* Y = Y_v.data();
  // dot items of the same bytes whatever the weights' dtype (16-bit weights: twice the columns)
  constexpr int64_t widen = sizeof(float) / sizeof(T);
  const int64_t gate_block = a.gate.si == 1 ? DOT_GATE_BLOCK * widen : AXPY_GATE_BLOCK;
  const int64_t down_block = a.down.si == 1 ? DOT_DOWN_BLOCK * widen : AXPY_DOWN_BLOCK;
  const int64_t gate_blocks = (I + gate_block - 1) / gate_block;
  const int64_t down_blocks = (H + down_block - 1) / down_block;
  const float* x_base = direct_x ? static_cast<const float*>(a.hidden) : X;
  const int64_t x_ld = direct_x ? a.hidden_ld : H;

#pragma omp parallel num_threads(a.threads)
  {
    static thread_local Thread th;
    if (convert_x) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < a.T; t++) {
        if (a.hidden_dtype == BF16) hidden_to_f32<c10::BFloat16>(a, t, X + t * H);
        else hidden_to_f32<c10::Half>(a, t, X + t * H);
      }
    }
    // 1. gate_up + activation
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_active * gate_blocks; item++) {
      const int64_t ai = item / gate_blocks, j0 = (item % gate_blocks) * gate_block;
      const int64_t e = active[ai], s0 = start[ai], R = start[ai + 1] - s0;
      const int64_t nj = std::min(gate_block, I - j0);
      th.rows.resize(R);
      th.rows_bf16.resize(R);
      for (int64_t r = 0; r < R; r++) {
        const int64_t t = order[s0 + r] / a.k;
        if (gate_bf16) th.rows_bf16[r] = hidden_bf16 + t * a.hidden_ld;
        else th.rows[r] = x_base + t * x_ld;
      }
      const uint16_t* const* xb = gate_bf16 ? th.rows_bf16.data() : nullptr;
      th.gate.resize(R * 2 * nj);
      th.up.resize(R * nj);
      int64_t ld = nj;
      float* gate = th.gate.data();
      float* up = th.up.data();
      const bool interleaved = a.gate_form == INTERLEAVED, gated = a.gate_form != UP_ONLY;
      if (interleaved) {  // gate and up alternate: one contiguous block of 2 * nj columns
        project<T>(a.gate, e, H, a.gate_off + 2 * j0, 2 * nj, th.rows.data(), R, gate, 2 * nj, th.acc, xb);
        for (int64_t r = 0; r < R; r++)
          for (int64_t j = 0; j < nj; j++) {
            up[r * nj + j] = gate[r * 2 * nj + 2 * j + 1];
            gate[r * nj + j] = gate[r * 2 * nj + 2 * j];  // in place: index r*nj+j <= r*2nj+2j
          }
      } else {
        project<T>(a.gate, e, H, a.gate_off + j0, nj, th.rows.data(), R, gate, ld, th.acc, xb);
        if (gated) project<T>(a.up, e, H, a.up_off + j0, nj, th.rows.data(), R, up, ld, th.acc, xb);
      }
      if (a.b_gate_up && gated) {
        const int64_t step = interleaved ? 2 : 1;
        for (int64_t j = 0; j < nj; j++) {
          const float bg = bias_at<T>(a.b_gate_up, a.b_gate_up_se, a.b_gate_up_sc, e, a.gate_off + step * (j0 + j));
          const float bu = bias_at<T>(a.b_gate_up, a.b_gate_up_se, a.b_gate_up_sc, e,
                                      interleaved ? a.gate_off + 2 * (j0 + j) + 1 : a.up_off + j0 + j);
          for (int64_t r = 0; r < R; r++) {
            gate[r * ld + j] += bg;
            up[r * ld + j] += bu;
          }
        }
      }
      for (int64_t r = 0; r < R; r++) {
        activate(gate + r * ld, gated ? up + r * ld : nullptr, nj, a.act, a.p0, a.p1);
        if (down_bf16) std::copy(gate + r * ld, gate + r * ld + nj, Ab + (s0 + r) * I + j0);  // rounds
        else std::copy(gate + r * ld, gate + r * ld + nj, A + (s0 + r) * I + j0);
      }
    }
    // 2. down (+ bias)
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_active * down_blocks; item++) {
      const int64_t ai = item / down_blocks, h0 = (item % down_blocks) * down_block;
      const int64_t e = active[ai], s0 = start[ai], R = start[ai + 1] - s0;
      const int64_t nh = std::min(down_block, H - h0);
      th.rows.resize(R);
      th.rows_bf16.resize(R);
      for (int64_t r = 0; r < R; r++) {
        if (down_bf16) th.rows_bf16[r] = reinterpret_cast<const uint16_t*>(Ab + (s0 + r) * I);
        else th.rows[r] = A + (s0 + r) * I;
      }
      float* y = Y + s0 * H + h0;
      project<T>(a.down, e, I, h0, nh, th.rows.data(), R, y, H, th.acc, down_bf16 ? th.rows_bf16.data() : nullptr);
      if (a.b_down)
        for (int64_t r = 0; r < R; r++)
          for (int64_t h = 0; h < nh; h++) y[r * H + h] += bias_at<T>(a.b_down, a.b_down_se, a.b_down_sc, e, h0 + h);
    }
    // 2b. post-expert norm of every computed row (the sentinels' rows, after them, never are)
    if (a.post_norm == INPUT_SCALED_RMS) {
#pragma omp for schedule(static)
      for (int64_t row = 0; row < start[num_active]; row++)
        input_scaled_rms(Y + row * H, a.post_scale, H, a.post_eps, a.out_dtype);
    }
    // 3. weighted sum over the slots, in slot order
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.T; t++) {
      th.row.resize(H);
      float* acc = th.row.data();
      bool first = true;
      for (int64_t j = 0; j < a.k; j++) {
        if (a.ids[t * a.k + j] == a.E) continue;
        const float w = a.routed[t * a.k + j];
        const float* y = Y + slot_pos[t * a.k + j] * H;
        int64_t h = 0;
        const fVec wv(w);
        if (first) {
          first = false;
          for (; h + V <= H; h += V) (wv * fVec::loadu(y + h)).store(acc + h);
          for (; h < H; h++) acc[h] = w * y[h];
        } else {
          for (; h + V <= H; h += V) (fVec::loadu(acc + h) + wv * fVec::loadu(y + h)).store(acc + h);
          for (; h < H; h++) acc[h] = acc[h] + w * y[h];
        }
      }
      if (first) std::fill(acc, acc + H, 0.0f);  // every slot on another rank
      if (a.out_dtype == F32) store_row<float>(acc, a.out, t, H);
      else if (a.out_dtype == BF16) store_row<c10::BFloat16>(acc, a.out, t, H);
      else store_row<c10::Half>(acc, a.out, t, H);
    }
  }
}

}  // namespace lynx_experts

// Entry point (Inductor's Python binding calls kernel(...)). Tensors arrive as data pointers.
void kernel(const void* hidden, const int64_t* ids, const float* routed, const void* w_gate, const void* w_up,
            const void* w_down, const void* b_gate_up, const void* b_down, void* out,
            int64_t T, int64_t H, int64_t I, int64_t k, int64_t E, int64_t hidden_ld, int64_t hidden_dtype,
            int64_t weight_dtype, int64_t gate_se, int64_t gate_si, int64_t gate_so, int64_t gate_off,
            int64_t up_se, int64_t up_si, int64_t up_so, int64_t up_off, int64_t gate_form,
            int64_t down_se, int64_t down_si, int64_t down_so, int64_t has_b_gate_up, int64_t b_gate_up_se,
            int64_t b_gate_up_sc, int64_t has_b_down, int64_t b_down_se, int64_t b_down_sc, int64_t act,
            float p0, float p1, int64_t threads, const float* post_scale, int64_t post_norm, float post_eps,
            int64_t bf16_dot) {
  using namespace lynx_experts;
  Args a{T, H, I, k, E, hidden, hidden_ld, hidden_dtype, ids, routed,
         Mat{w_gate, gate_se, gate_si, gate_so}, Mat{w_up, up_se, up_si, up_so}, Mat{w_down, down_se, down_si, down_so},
         gate_off, up_off, gate_form, has_b_gate_up ? b_gate_up : nullptr, b_gate_up_se, b_gate_up_sc,
         has_b_down ? b_down : nullptr, b_down_se, b_down_sc, act, p0, p1, post_scale, post_norm, post_eps, out,
         hidden_dtype, std::max<int64_t>(threads, 1), bf16_dot != 0};
  if (T == 0) return;
  if (weight_dtype == F32) run<float>(a);
  else if (weight_dtype == BF16) run<c10::BFloat16>(a);
  else run<c10::Half>(a);
}
