// What bounds the bf16 experts kernel at many rows per expert: the arithmetic, or how its reads
// overlap it. Three measurements, interleaved, medians of 7, on the machine's 2 threads:
//   - a plain streaming read (the sum of 256 MB, one contiguous half per thread);
//   - the peak rate of vdpbf16ps (16 independent accumulators, registers only);
//   - the experts kernel's read pattern without its bookkeeping: groups of 8 weight rows of 4 KB
//     (one bf16 row of K = 2048), walked in 2 KB chunks, each chunk passed over `passes` times by
//     vdpbf16ps (passes 2.. hit L1: the kernel's tiles of 2 input rows at 4 or 6 rows per expert).
// If the passes cost only their arithmetic, GB/s would hold until the dot products run out.
//
//   g++ -O3 -march=native -fopenmp benchmarks/cpu_read_pattern.cpp -o cpu_read_pattern && ./cpu_read_pattern
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

__attribute__((target("avx512f"))) static double streaming_gbps(const float* buf, int64_t n) {
  const auto start = Clock::now();
  float total = 0.f;
#pragma omp parallel for num_threads(2) reduction(+ : total) schedule(static)
  for (int64_t block = 0; block < n; block += 1 << 16) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = block; i < block + (1 << 16); i += 64) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(buf + i));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(buf + i + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(buf + i + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(buf + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
  const double t = seconds_since(start);
  if (total == 1.2345f) std::printf(" ");  // keeps the sum
  return n * sizeof(float) / t / 1e9;
}

// Billions of vdpbf16ps per second on `threads` threads.
BF16 static double dot_peak(int threads) {
  constexpr int64_t iters = 20000000;
  const auto start = Clock::now();
  float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_ps(static_cast<float>(i + omp_get_thread_num()));
    __m512i w = _mm512_set1_epi16(0x3f80), x = _mm512_set1_epi16(0x3f80);
    for (int64_t n = 0; n < iters; n++) {
      __asm__ volatile("" : "+v"(w), "+v"(x));  // the inputs are not constants
#pragma GCC unroll 16
      for (int i = 0; i < 16; i++) a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)w, (__m512bh)x);
    }
    __m512 s = a[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, a[i]);
    total += _mm512_reduce_add_ps(s);
  }
  const double t = seconds_since(start);
  if (total == 1.2345f) std::printf(" ");
  return threads * iters * 16 / t / 1e9;
}

// GB/s of weights through the kernel's pattern: 8 rows of `row` bytes per group, chunks of
// `chunk` bytes, each passed over `passes` times.
BF16 static double pattern_gbps(const char* buf, int64_t bytes, int passes) {
  constexpr int rows = 8;
  constexpr int64_t row = 4096, chunk = 2048, group = rows * row;
  const int64_t groups = bytes / group;
  const auto start = Clock::now();
  float total = 0.f;
#pragma omp parallel for num_threads(2) reduction(+ : total) schedule(dynamic, 8)
  for (int64_t g = 0; g < groups; g++) {
    const char* base = buf + g * group;
    __m512 acc[rows];
    for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
    const __m512i x = _mm512_set1_epi16(0x3f80);
    for (int64_t k0 = 0; k0 < row; k0 += chunk)
      for (int p = 0; p < passes; p++)
        for (int64_t k = k0; k < k0 + chunk; k += 64)
          for (int i = 0; i < rows; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(base + i * row + k), (__m512bh)x);
    __m512 s = acc[0];
    for (int i = 1; i < rows; i++) s = _mm512_add_ps(s, acc[i]);
    total += _mm512_reduce_add_ps(s);
  }
  const double t = seconds_since(start);
  if (total == 1.2345f) std::printf(" ");
  return groups * group / t / 1e9;
}

int main() {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("needs a CPU with AVX512-BF16\n");
    return 1;
  }
  std::vector<float> big(64 << 20, 1.f);           // 256 MB
  std::vector<char> weights(int64_t(1) << 30, 1);  // 1 GB: far past any cache
  const int pass_counts[] = {1, 2, 3, 6};
  std::vector<double> stream, peak1, peak2, pattern[4];
  for (int rep = 0; rep < 7; rep++) {
    stream.push_back(streaming_gbps(big.data(), static_cast<int64_t>(big.size())));
    peak1.push_back(dot_peak(1));
    peak2.push_back(dot_peak(2));
    for (int i = 0; i < 4; i++) pattern[i].push_back(pattern_gbps(weights.data(), static_cast<int64_t>(weights.size()), pass_counts[i]));
  }
  std::printf("streaming read (256 MB sum, 2 threads): %.1f GB/s\n", median(stream));
  std::printf("vdpbf16ps peak: %.2f G/s on 1 thread, %.2f G/s on 2\n", median(peak1), median(peak2));
  std::printf("the kernel's read pattern (8 rows x 4 KB, 2 KB chunks), 2 threads:\n");
  for (int i = 0; i < 4; i++) {
    const double gbps = median(pattern[i]);
    // one vdpbf16ps per 64 bytes per pass
    std::printf("  %d pass%s per chunk: %5.1f GB/s of weights, %.2f G vdpbf16ps/s (%2.0f%% of peak)\n", pass_counts[i],
                pass_counts[i] > 1 ? "es" : "  ", gbps, gbps / 64 * pass_counts[i], 100 * gbps / 64 * pass_counts[i] / median(peak2));
  }
}
