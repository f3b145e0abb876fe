// The selector's choice steps on CPU, as two ATen ops (CPU kernels of the schemas select_cpu.py
// defines): the exact integer arithmetic of policies/affinity_binning.kept_experts and
// policies/rules.finish, with their tie rules, in one pass over each row instead of a dozen
// tensor ops, two top-k calls and an index_put.
//
//   lynx::affinity_kept   [E] bool: the union of the voters' top-k under AffinityBinning
//                         (bin, exact int64 batch score S, the router's order, index);
//   lynx::choose_in_kept  [T, k] ids: each row's best experts by the router's order in three
//                         tiers (inside the kept set, usable only, unusable), the valid slots,
//                         and optionally the row's plain top-k (for the plain-mass weights).
//
// Registered as a library's CPU kernels, so a compiled graph calls them like aten.topk (no
// Python in between). Compiled at first use by Inductor's C++ code cache (select_cpu.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

int index_bits(int64_t num_experts) {
  int bits = 0;
  for (int64_t v = num_experts - 1; v > 0; v >>= 1) bits++;
  return std::max(bits, 1);
}

// rules.order_key: the fp32 bits ordered like the floats (-0.0 as +0.0), then the reverse index.
inline int64_t order_key(float score, int64_t e, int64_t num_experts, int bits) {
  if (score == 0.0f) score = 0.0f;
  int32_t raw;
  std::memcpy(&raw, &score, sizeof(raw));
  const int32_t ordered = raw ^ ((raw >> 31) & 0x7FFFFFFF);
  return static_cast<int64_t>(ordered) * (int64_t(1) << bits) + (num_experts - 1 - e);
}

// Indices of the k largest of E distinct keys, the largest first (torch.topk's order).
template <typename Key>
void top_k_of(const Key* key, int64_t num_experts, int64_t k, int64_t* out, Key* best) {
  int64_t n = 0;
  for (int64_t e = 0; e < num_experts; e++) {
    const Key v = key[e];
    if (n == k && !(best[k - 1] < v)) continue;
    int64_t j = n < k ? n++ : k - 1;
    for (; j > 0 && best[j - 1] < v; j--) {
      best[j] = best[j - 1];
      out[j] = out[j - 1];
    }
    best[j] = v;
    out[j] = e;
  }
}

// kept_experts' packed key as a triple: (bin, batch score, router order) for an allowed expert;
// a disallowed one sorts below all of them, the higher index first (its key there is INT64_MIN + e).
struct VoteKey {
  int64_t bin, score, order;
  bool operator<(const VoteKey& o) const {
    if (bin != o.bin) return bin < o.bin;
    if (score != o.score) return score < o.score;
    return order < o.order;
  }
};

at::Tensor affinity_kept(const at::Tensor& rank_in, const at::Tensor& affinity_in, const at::Tensor& voters_in,
                         int64_t top_k, double alpha, at::IntArrayRef depth_limits) {
  TORCH_CHECK(rank_in.dim() == 2 && rank_in.scalar_type() == at::kFloat, "rank must be fp32 [T, E]");
  TORCH_CHECK(affinity_in.sizes() == rank_in.sizes() && affinity_in.scalar_type() == at::kFloat,
              "affinity must be fp32 like rank");
  const at::Tensor rank = rank_in.contiguous(), affinity = affinity_in.contiguous();
  const at::Tensor voters = voters_in.to(at::kBool).contiguous();
  const int64_t T = rank.size(0), E = rank.size(1);
  TORCH_CHECK(voters.numel() == T, "voters must have one entry per row");
  TORCH_CHECK(1 <= top_k && top_k <= E, "top_k out of range");
  const float* r = rank.data_ptr<float>();
  const float* a = affinity.data_ptr<float>();
  const bool* v = voters.data_ptr<bool>();
  const int bits = index_bits(E);
  const float alpha_f = static_cast<float>(alpha);  // the op's fp32 multiply by a Python float

  int64_t count = 0;
  for (int64_t t = 0; t < T; t++) count += v[t];
  at::Tensor kept = at::zeros({E}, rank.options().dtype(at::kBool));
  bool* out = kept.data_ptr<bool>();
  if (count == 0) {  // nobody votes: every expert stays
    std::fill(out, out + E, true);
    return kept;
  }
  int64_t depth = 0;
  for (int64_t limit : depth_limits) depth += count <= limit;
  std::vector<int64_t> power(depth + 1, 1);  // count ** q, exact by the limits
  for (int64_t q = 1; q <= depth; q++) power[q] = power[q - 1] * count;

  // bins (shifted to 0..depth) of every voter, and the batch's exact score of each expert
  std::vector<int64_t> shifted(T * E, 0), score(E, 0);
  for (int64_t t = 0; t < T; t++) {
    if (!v[t]) continue;
    const float* at_row = a + t * E;
    float best = -INFINITY;
    for (int64_t e = 0; e < E; e++) best = std::max(best, at_row[e]);
    for (int64_t e = 0; e < E; e++) {
      const float bin = std::max(std::ceil((at_row[e] - best) * alpha_f), -static_cast<float>(depth));
      const int64_t s = static_cast<int64_t>(bin + static_cast<float>(depth));
      shifted[t * E + e] = s;
      if (r[t * E + e] > -INFINITY) score[e] += power[s];
    }
  }
  std::vector<VoteKey> key(E), best(top_k);
  std::vector<int64_t> chosen(top_k);
  for (int64_t t = 0; t < T; t++) {
    if (!v[t]) continue;
    for (int64_t e = 0; e < E; e++) {
      const float x = r[t * E + e];
      key[e] = x > -INFINITY ? VoteKey{shifted[t * E + e], score[e], order_key(x, e, E, bits)}
                             : VoteKey{-1, 0, e};
    }
    top_k_of(key.data(), E, top_k, chosen.data(), best.data());
    for (int64_t j = 0; j < top_k; j++) out[chosen[j]] = true;
  }
  return kept;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> choose_in_kept(const at::Tensor& rank_in, const at::Tensor& kept_in,
                                                              const at::Tensor& confined_in,
                                                              const at::Tensor& healthy_in, int64_t top_k,
                                                              bool refill, bool with_plain) {
  TORCH_CHECK(rank_in.dim() == 2 && rank_in.scalar_type() == at::kFloat, "rank must be fp32 [T, E]");
  const at::Tensor rank = rank_in.contiguous();
  const int64_t T = rank.size(0), E = rank.size(1);
  const at::Tensor kept = kept_in.to(at::kBool).contiguous();
  const at::Tensor confined = confined_in.to(at::kBool).contiguous();
  const at::Tensor healthy = healthy_in.to(at::kBool).contiguous();
  TORCH_CHECK(kept.numel() == E && confined.numel() == T && healthy.numel() == T, "mask sizes");
  TORCH_CHECK(1 <= top_k && top_k <= E, "top_k out of range");
  const float* r = rank.data_ptr<float>();
  const bool* kp = kept.data_ptr<bool>();
  const bool* cf = confined.data_ptr<bool>();
  const bool* hl = healthy.data_ptr<bool>();
  const int bits = index_bits(E);
  const int64_t tier_step = int64_t(1) << (33 + bits);

  at::Tensor ids = at::empty({T, top_k}, rank.options().dtype(at::kLong));
  at::Tensor valid = at::empty({T, top_k}, rank.options().dtype(at::kBool));
  at::Tensor plain = at::empty({T, with_plain ? top_k : 0}, rank.options().dtype(at::kLong));
  int64_t* ids_p = ids.data_ptr<int64_t>();
  bool* valid_p = valid.data_ptr<bool>();
  int64_t* plain_p = plain.data_ptr<int64_t>();
  // rows are independent; small steps (decode) stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> key(E), order(E), best(top_k);
    for (int64_t t = begin; t < end; t++) {
      const float* row = r + t * E;
      int64_t usable_count = 0;
      for (int64_t e = 0; e < E; e++) {
        const bool allowed = row[e] > -INFINITY;
        const bool preferred = hl[t] ? allowed && (kp[e] || !cf[t]) : true;
        const bool usable = refill ? (hl[t] ? allowed : true) : preferred;
        order[e] = order_key(row[e], e, E, bits);
        key[e] = order[e] - (int64_t(!usable) + int64_t(!preferred)) * tier_step;
        usable_count += usable;
      }
      int64_t* out = ids_p + t * top_k;
      top_k_of(key.data(), E, top_k, out, best.data());
      for (int64_t j = 0; j < top_k; j++) {
        valid_p[t * top_k + j] = j < usable_count;
        if (j >= usable_count) out[j] = out[0];  // a short row repeats its first expert (weight 0)
      }
      if (with_plain) top_k_of(order.data(), E, top_k, plain_p + t * top_k, best.data());
    }
  });
  return {ids, valid, plain};
}

// Both in one call (policy lynx, no expert-parallel cap): one dispatch per layer instead of two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_choose(const at::Tensor& rank, const at::Tensor& affinity,
                                                               const at::Tensor& voters, const at::Tensor& confined,
                                                               const at::Tensor& healthy, int64_t top_k, double alpha,
                                                               at::IntArrayRef depth_limits, bool with_plain) {
  const at::Tensor kept = affinity_kept(rank, affinity, voters, top_k, alpha, depth_limits);
  return choose_in_kept(rank, kept, confined, healthy, top_k, false, with_plain);
}

}  // namespace

TORCH_LIBRARY_IMPL(lynx, CPU, m) {
  m.impl("affinity_kept", &affinity_kept);
  m.impl("choose_in_kept", &choose_in_kept);
  m.impl("affinity_choose", &affinity_choose);
}
