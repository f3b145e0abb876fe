// A/B timing of builds of the fused CPU experts kernel (experts_cpu.cpp), interleaved in one
// process: on a shared host whose bandwidth moves within minutes, only runs side by side compare.
// One OLMoE-1B-7B layer (H 2048, I 1024, E 64, k 8, skewed routing as in experts_cpu.py), each
// build called once per round after a streaming read (the probe), the order rotating from round
// to round (the first call after the probe runs about 5% slower); medians over the rounds. A
// build whose output differs from the first build's is reported (bitwise: the kernel's results
// do not depend on its tiling or prefetching).
//
//   bash benchmarks/experts_cpu_ab.sh bf16 old=OLD.cpp new=lynx_compile/kernels/experts_cpu.cpp
//
// The driver writes the builds' #include list (each source in its own namespace) and compiles
// this file with torch's headers; see experts_cpu_ab.sh.
#include "experts_cpu_ab_builds.inc"  // AB_KERNELS, AB_NAMES

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using Clock = std::chrono::steady_clock;
using Kernel = decltype(&AB_FIRST_KERNEL);

static double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// GB/s of a plain read of buf on 2 threads (an integer sum: the compiler vectorises it, where a
// float sum would keep its order and run serially)
static double streaming_gbps(const std::vector<uint32_t>& buf) {
  const auto start = Clock::now();
  uint32_t total = 0;
#pragma omp parallel for num_threads(2) reduction(+ : total) schedule(static)
  for (int64_t i = 0; i < static_cast<int64_t>(buf.size()); i++) total += buf[i];
  const double t = seconds_since(start);
  if (total == 12345) std::printf(" ");  // keeps the sum
  return buf.size() * sizeof(uint32_t) / t / 1e9;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s fp32|bf16|bf16-widened ROUNDS [BATCH ...]\n", argv[0]);
    return 2;
  }
  const int64_t H = 2048, I = 1024, E = 64, k = 8;
  const std::string mode = argv[1];  // bf16-widened: bf16 weights on the fp32 dot kernel
  const bool bf16 = mode == "bf16" || mode == "bf16-widened", bf16_dot = mode == "bf16";
  const int rounds = std::atoi(argv[2]);
  // AB_ROUTING=uniform: every expert gets the same number of rows (T * k / E), not skewed routing
  const bool uniform = std::getenv("AB_ROUTING") && std::string(std::getenv("AB_ROUTING")) == "uniform";
  std::vector<int> batches;
  for (int i = 3; i < argc; i++) batches.push_back(std::atoi(argv[i]));
  if (batches.empty()) batches = {1, 4, 16, 32};
  const int64_t elem = bf16 ? 2 : 4;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto fill = [&](std::vector<char>& v) {
    if (bf16) {
      auto* p = reinterpret_cast<uint16_t*>(v.data());
      for (size_t i = 0; i < v.size() / 2; i++) p[i] = c10::BFloat16(normal(rng) * 0.02f).x;
    } else {
      auto* p = reinterpret_cast<float*>(v.data());
      for (size_t i = 0; i < v.size() / 4; i++) p[i] = normal(rng) * 0.02f;
    }
  };
  std::vector<char> w_gate_up(E * 2 * I * H * elem), w_down(E * H * I * elem);
  fill(w_gate_up);
  fill(w_down);
  std::vector<uint32_t> probe_buf(64 << 20, 1);  // 256 MB
  std::vector<float> popularity(E);
  for (auto& p : popularity) p = normal(rng) * 1.5f;
  const Kernel kernels[] = {AB_KERNELS};
  const char* names[] = {AB_NAMES};
  const int builds = sizeof(kernels) / sizeof(kernels[0]);
  for (const int T : batches) {
    std::vector<int64_t> ids(T * k);
    std::vector<float> routed(T * k, 1.f / k);
    for (int t = 0; t < T; t++) {  // top-k of popularity + noise: k distinct experts per token
      std::vector<std::pair<float, int>> logits(E);
      for (int e = 0; e < E; e++) logits[e] = {popularity[e] + normal(rng) * 1.5f, e};
      std::partial_sort(logits.begin(), logits.begin() + k, logits.end(), std::greater<>());
      for (int j = 0; j < k; j++) ids[t * k + j] = uniform ? (t * k + j) % E : logits[j].second;
    }
    std::vector<int64_t> distinct(ids);
    std::sort(distinct.begin(), distinct.end());
    const int64_t active = std::unique(distinct.begin(), distinct.end()) - distinct.begin();
    std::vector<char> hidden(T * H * elem), out(T * H * elem), first_out(T * H * elem);
    fill(hidden);
    auto call = [&](int b, char* dst) {  // gate_up_concat, silu, no bias, 2 threads
      kernels[b](hidden.data(), ids.data(), routed.data(), w_gate_up.data(), w_gate_up.data(), w_down.data(),
                 w_gate_up.data(), w_gate_up.data(), dst, T, H, I, k, E, H, bf16, bf16, 2 * I * H, 1, H, 0,
                 2 * I * H, 1, H, I, 0, H * I, 1, I, 0, 0, 0, 0, 0, 0, 0, 0.f, 0.f, 2, routed.data(), 0, 0.f, bf16_dot);
    };
    call(0, first_out.data());
    for (int b = 1; b < builds; b++) {
      call(b, out.data());
      if (out != first_out) std::printf("build %s: output differs from %s's\n", names[b], names[0]);
    }
    std::vector<std::vector<double>> times(builds);
    std::vector<double> probes;
    for (int r = 0; r < rounds; r++) {
      probes.push_back(streaming_gbps(probe_buf));
      for (int i = 0; i < builds; i++) {
        const int b = (r + i) % builds;  // each build first after the probe as often: that call runs cold
        const auto start = Clock::now();
        call(b, out.data());
        times[b].push_back(seconds_since(start));
      }
    }
    const double gb = active * 3 * H * I * elem / 1e9, probe = median(probes);
    std::printf("%s batch %d, %ld experts, streaming read %.1f GB/s:", mode.c_str(), T, active, probe);
    for (int b = 0; b < builds; b++) {
      const double gbps = gb / median(times[b]);
      std::printf("  %s %.1f GB/s (%.0f%%)", names[b], gbps, 100 * gbps / probe);
    }
    std::printf("\n");
  }
}
