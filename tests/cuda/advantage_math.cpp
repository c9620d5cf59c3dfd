// Host driver of csrc/include/grpo_kernels/advantage_math.cuh for tests/test_cuda_host_math.py.
//
// Built with g++ (no CUDA). Runs the advantage kernels' algorithm on the host with their own helpers, in the order a
// warp does: 32 lanes walk a group's rows lane-strided, their partial states combine with the xor butterfly
// (offsets 16, 8, 4, 2, 1); the batch summaries (gpg's alpha, the whitening statistics) likewise over the batch.
// One case per line on stdin, one line of advantages on stdout; floats as C99 hex ("nan" accepted):
//
//   ADV estimator scale eps B G cu_1 .. cu_G t_0 .. t_{B-1} len_0 .. len_{B-1}
//       rows already sorted by group (group g = rows cu_g .. cu_{g+1} - 1, cu_0 = 0); t = row totals
//       -> A_0 .. A_{B-1}
#include <array>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "grpo_kernels/advantage_math.cuh"

using namespace grpo_kernels;

namespace {

constexpr int kLanes = 32;

float read_f(std::istringstream& in) {
  std::string tok;
  in >> tok;
  return std::strtof(tok.c_str(), nullptr);
}

long read_i(std::istringstream& in) {
  long v = 0;
  in >> v;
  return v;
}

// warp_sum of advantages.cuh: every lane adds its xor partner's value, offsets 16 .. 1.
double butterfly_sum(std::array<double, kLanes> lanes) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::array<double, kLanes> next{};
    for (int l = 0; l < kLanes; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    lanes = next;
  }
  return lanes[0];
}

GroupSums butterfly_merge(std::array<GroupSums, kLanes> lanes) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::array<GroupSums, kLanes> next{};
    for (int l = 0; l < kLanes; ++l) next[l] = group_sums_merge(lanes[l], lanes[l ^ offset]);
    lanes = next;
  }
  for (int l = 1; l < kLanes; ++l) {  // the merge is commutative bit for bit: every lane ends with one state
    if (lanes[l].count != lanes[0].count || lanes[l].top != lanes[0].top || lanes[l].second != lanes[0].second ||
        lanes[l].top_count != lanes[0].top_count || lanes[l].sum_len_t != lanes[0].sum_len_t) {
      std::fprintf(stderr, "lanes disagree after the butterfly\n");
      std::exit(1);
    }
  }
  return lanes[0];
}

// group_stats_kernel: NaN-aware mean and Bessel-corrected std over rows [first, last), two passes in double.
void group_stats(const std::vector<float>& t, long first, long last, float& mean, float& std_dev) {
  std::array<double, kLanes> count{}, sum{}, squares{};
  for (long i = first; i < last; ++i) {
    if (t[i] == t[i]) {
      count[(i - first) % kLanes] += 1.0;
      sum[(i - first) % kLanes] += t[i];
    }
  }
  const double n = butterfly_sum(count), mu = butterfly_sum(sum) / n;
  for (long i = first; i < last; ++i) {
    if (t[i] == t[i]) squares[(i - first) % kLanes] += (t[i] - mu) * (t[i] - mu);
  }
  const double sq = butterfly_sum(squares);
  mean = static_cast<float>(mu);
  std_dev = n > 1.0 ? static_cast<float>(std::sqrt(sq / (n - 1.0))) : NAN;
}

void run_adv(std::istringstream& in) {
  const auto estimator = static_cast<AdvantageEstimator>(read_i(in));
  const auto scale = static_cast<AdvantageScale>(read_i(in));
  const float eps = read_f(in);
  const long batch = read_i(in), groups = read_i(in);
  std::vector<long> cu{0};
  for (long g = 0; g < groups; ++g) cu.push_back(read_i(in));
  std::vector<float> t(batch), len(batch);
  for (auto& x : t) x = read_f(in);
  for (auto& x : len) x = read_f(in);

  std::vector<GroupSummary> summary(groups);
  std::vector<long> group_of(batch);
  for (long g = 0; g < groups; ++g) {
    float mean, std_dev;
    group_stats(t, cu[g], cu[g + 1], mean, std_dev);
    std::array<GroupSums, kLanes> lanes;
    lanes.fill(group_sums_empty());
    for (long i = cu[g]; i < cu[g + 1]; ++i) {
      group_sums_push(lanes[(i - cu[g]) % kLanes], t[i], len[i]);
      group_of[i] = g;
    }
    summary[g] = group_summary(mean, std_dev, butterfly_merge(lanes));
  }

  BatchSummary b{NAN, NAN, NAN, NAN, NAN};
  if (estimator == AdvantageEstimator::kGpg) {  // batch_summary_kernel
    std::array<double, kLanes> nonzero{};
    for (long i = 0; i < batch; ++i) nonzero[i % kLanes] += (t[i] == t[i] && t[i] != 0.f) ? 1.0 : 0.0;
    const double n = butterfly_sum(nonzero);
    b.gpg_alpha = static_cast<float>(static_cast<double>(batch) / (n > 1.0 ? n : 1.0));
  }
  if (estimator == AdvantageEstimator::kReinforcePlusPlusBaseline) {
    std::array<double, kLanes> weight{}, sum{}, squares{};
    std::vector<float> c(batch);
    for (long i = 0; i < batch; ++i) {
      c[i] = centred_for_whitening(t[i], summary[group_of[i]].mean, summary[group_of[i]].count);
      if (c[i] == c[i]) {
        weight[i % kLanes] += len[i];
        sum[i % kLanes] += static_cast<double>(len[i]) * c[i];
      }
    }
    const double w = butterfly_sum(weight), s = butterfly_sum(sum), mu = s / w;
    for (long i = 0; i < batch; ++i) {
      if (c[i] == c[i]) squares[i % kLanes] += static_cast<double>(len[i]) * (c[i] - mu) * (c[i] - mu);
    }
    whiten_stats(w, s, butterfly_sum(squares), b.whiten_mean, b.whiten_inv_std);
  }
  for (long i = 0; i < batch; ++i) {
    std::printf(i ? " %a" : "%a", static_cast<double>(row_advantage(estimator, scale, false, eps, t[i],
                                                                      summary[group_of[i]], b)));
  }
  std::printf("\n");
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string kind;
    in >> kind;
    if (kind == "ADV") {
      run_adv(in);
    } else {
      std::fprintf(stderr, "unknown case '%s'\n", kind.c_str());
      return 1;
    }
  }
  return 0;
}
