// The per-group and per-row math of the grouped advantages, as __host__ __device__ inline functions.
//
// Framework-free and compilable as plain C++: tests/test_cuda_host_math.py builds tests/cuda/advantage_math.cpp with
// g++, which runs these helpers in the order a warp does (32 lane-strided partial states, then the xor butterfly)
// and compares the advantages with grpo_kernels.reference in float64. The estimators are docs/math.md section 10:
//
//   grpo         (t - mean_g) / (std_g + eps)   | / (std_batch + eps) | no division   (scale group | batch | none)
//   rloo         n/(n-1) (t - mean_g)
//   grpo_passk   (max_g - runner-up_g) [/ (std_g + eps)] for the unique max of the group, else 0
//   reinforce_plus_plus_baseline  c = t - mean_g, then (c - mu) / sqrt(var + 1e-8), mu and var over the batch with
//                weights len (the batch's tokens)
//   opo          t - sum_g(len t) / sum_g(len)
//   gpg          B / max(1, #{t != 0}) (t - mean_g)
//
// t is a row total (NaN: unscorable). Rows without a baseline (NaN t, or fewer than 2 valid rows in the group; opo:
// also no tokens in the group) get 0.
#pragma once

#include <cfloat>

#include "platform.cuh"

namespace grpo_kernels {

enum class AdvantageScale : int { kGroup = 0, kBatch = 1, kNone = 2 };
enum class AdvantageEstimator : int {
  kGrpo = 0,
  kRloo = 1,
  kGrpoPassk = 2,
  kReinforcePlusPlusBaseline = 3,
  kOpo = 4,
  kGpg = 5,
};

constexpr double kWhitenEps = 1e-8;  // reinforce_plus_plus_baseline: verl's masked_whiten

// torch.nan_to_num(x, nan=0.0): NaN -> 0, +-inf -> +-FLT_MAX.
GK_HOST_DEVICE float nan_to_num(float x) {
  if (x != x) return 0.f;
  if (x == INFINITY) return FLT_MAX;
  if (x == -INFINITY) return -FLT_MAX;
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-group sums beyond mean/std: valid rows, opo's length sums, grpo_passk's top two. Sums in double; max and counts
// are exact, so merging is commutative bit for bit and every lane of a butterfly ends with the same state.
// ---------------------------------------------------------------------------------------------------------------
struct GroupSums {
  double count;      // valid rows
  double sum_len;    // sum of len over valid rows (opo)
  double sum_len_t;  // sum of len * t over valid rows (opo)
  float top;         // max t (-inf: none)
  float second;      // largest t below top (-inf: none)
  double top_count;  // rows holding top
};

GK_HOST_DEVICE GroupSums group_sums_empty() { return {0.0, 0.0, 0.0, -INFINITY, -INFINITY, 0.0}; }

GK_HOST_DEVICE GroupSums group_sums_merge(const GroupSums& a, const GroupSums& b) {
  const float top = a.top > b.top ? a.top : b.top;
  const float below_a = a.top == top ? a.second : a.top;
  const float below_b = b.top == top ? b.second : b.top;
  return {a.count + b.count,
          a.sum_len + b.sum_len,
          a.sum_len_t + b.sum_len_t,
          top,
          below_a > below_b ? below_a : below_b,
          (a.top == top ? a.top_count : 0.0) + (b.top == top ? b.top_count : 0.0)};
}

// Add one row (t NaN: nothing to add); len is read only by opo (pass 0 otherwise).
GK_HOST_DEVICE void group_sums_push(GroupSums& s, float t, float len) {
  if (t != t) return;
  GroupSums one{1.0, static_cast<double>(len), static_cast<double>(len) * static_cast<double>(t), t, -INFINITY, 1.0};
  s = group_sums_merge(s, one);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-row advantage
// ---------------------------------------------------------------------------------------------------------------
struct GroupSummary {  // what a row needs from its group
  float mean, std_dev;   // NaN-aware, Bessel-corrected (std NaN below 2 valid rows)
  float count;           // valid rows
  float baseline;        // opo: sum(len t) / sum(len) (NaN without tokens)
  float top, second;     // grpo_passk
  float top_count;
};

struct BatchSummary {  // what a row needs from the whole batch
  float mean, std_dev;   // of the totals: scale batch, normalize_then_sum
  float gpg_alpha;       // B / max(1, #nonzero valid totals)
  float whiten_mean;     // reinforce_plus_plus_baseline: weighted mean of the centred totals
  float whiten_inv_std;  // 1 / sqrt(var + 1e-8); NaN when the weights sum to <= 1 (every advantage 0)
};

GK_HOST_DEVICE GroupSummary group_summary(float mean, float std_dev, const GroupSums& s) {
  return {mean, std_dev, static_cast<float>(s.count), static_cast<float>(s.sum_len_t / s.sum_len), s.top, s.second,
          static_cast<float>(s.top_count)};
}

// reinforce_plus_plus_baseline before whitening: t - mean_g, NaN for a row without a baseline.
GK_HOST_DEVICE float centred_for_whitening(float t, float mean, float count) {
  return count > 1.f ? t - mean : NAN;
}

GK_HOST_DEVICE float row_advantage(AdvantageEstimator estimator, AdvantageScale scale, bool normalize_then_sum,
                                   float eps, float t, const GroupSummary& g, const BatchSummary& b) {
  float adv;
  switch (estimator) {
    case AdvantageEstimator::kRloo:
      adv = g.count > 1.f ? (t - g.mean) * (g.count / (g.count - 1.f)) : NAN;
      break;
    case AdvantageEstimator::kGrpoPassk: {
      float gap = g.top - g.second;
      if (scale == AdvantageScale::kGroup) gap = gap / (g.std_dev + eps);
      adv = (g.count > 1.f && t == g.top && g.top_count == 1.f) ? gap : 0.f;
      break;
    }
    case AdvantageEstimator::kReinforcePlusPlusBaseline:
      adv = (centred_for_whitening(t, g.mean, g.count) - b.whiten_mean) * b.whiten_inv_std;
      break;
    case AdvantageEstimator::kOpo:
      adv = g.count > 1.f ? t - g.baseline : NAN;
      break;
    case AdvantageEstimator::kGpg:
      adv = g.count > 1.f ? (t - g.mean) * b.gpg_alpha : NAN;
      break;
    default:  // grpo
      if (normalize_then_sum) {
        adv = (t - b.mean) / (b.std_dev + eps);
      } else {
        const float centred = t - g.mean;
        adv = scale == AdvantageScale::kGroup   ? centred / (g.std_dev + eps)
              : scale == AdvantageScale::kBatch ? centred / (b.std_dev + eps)
                                                : centred;
      }
  }
  return nan_to_num(adv);
}

// reinforce_plus_plus_baseline's batch statistics from the sums over rows with a baseline: W = sum w, S = sum w c,
// Q = sum w (c - S / W)^2 (two passes, in double).
GK_HOST_DEVICE void whiten_stats(double weight, double sum, double sum_sq_dev, float& mean, float& inv_std) {
  mean = static_cast<float>(sum / weight);
  inv_std = weight > 1.0 ? static_cast<float>(1.0 / sqrt(sum_sq_dev / (weight - 1.0) + kWhitenEps)) : NAN;
}

}  // namespace grpo_kernels
