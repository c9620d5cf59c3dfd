// Grouped advantages (docs/math.md section 2, docs/math.md section 10): NaN-aware group statistics, deterministic (no
// atomics).
//
// Groups arrive as runs of a sorted order (rows order[cu[g]:cu[g+1]] form group g), which covers both TRL's fixed
// groups (order = identity, cu = 0, G, 2G, ...) and arbitrary group ids. One warp owns a group: each lane walks a
// fixed subset of the members and the lanes combine with a fixed butterfly, in float64, so the same rewards give the
// same bits on every run. Batches are small (B ~ 10^3..10^4 rows), so the kernels are launch-bound, not
// bandwidth-bound: clarity over speed. The per-row formula of every estimator and the per-group sums beyond mean/std
// are the host-testable helpers of advantage_math.cuh.
#pragma once

#include <cfloat>

#include "advantage_math.cuh"
#include "launch.h"

namespace grpo_kernels {

GK_DEVICE double warp_sum(double x) {
  GK_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Statistics of values[row * stride] over each group's rows: nanmean and Bessel-corrected nanstd (NaN below 2 valid
// entries). order == nullptr: rows in natural order; cu == nullptr: one group of all `rows`.
// Writes mean[g * out_stride], std[g * out_stride].
__global__ void __launch_bounds__(256) group_stats_kernel(const float* __restrict__ values, int64_t stride,
                                                          const int64_t* __restrict__ order,
                                                          const int64_t* __restrict__ cu, int64_t num_groups,
                                                          int64_t rows, float* mean, float* std_dev,
                                                          int64_t out_stride) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; g < num_groups; g += warps) {
    const int64_t first = cu != nullptr ? cu[g] : 0, last = cu != nullptr ? cu[g + 1] : rows;
    auto value = [&](int64_t i) {
      const int64_t row = order != nullptr ? order[i] : i;
      return static_cast<double>(values[row * stride]);
    };
    double count = 0.0, sum = 0.0;
    for (int64_t i = first + lane; i < last; i += 32) {
      const double v = value(i);
      if (v == v) {
        count += 1.0;
        sum += v;
      }
    }
    count = warp_sum(count);
    const double mu = warp_sum(sum) / count;  // 0 / 0 = NaN for a group without valid rewards
    double squares = 0.0;
    for (int64_t i = first + lane; i < last; i += 32) {
      const double v = value(i);
      if (v == v) squares += (v - mu) * (v - mu);
    }
    squares = warp_sum(squares);
    if (lane == 0) {
      mean[g * out_stride] = static_cast<float>(mu);
      std_dev[g * out_stride] = count > 1.0 ? static_cast<float>(sqrt(squares / (count - 1.0))) : NAN;
    }
  }
}

// Per row: the weighted NaN-sum of its rewards (normalize_then_sum: of its rewards normalised by their column's
// group statistics col_mean/col_std [G, R]); NaN for a row whose rewards are all NaN (unscorable).
__global__ void __launch_bounds__(256) row_totals_kernel(AdvantageArgs args, const float* __restrict__ col_mean,
                                                         const float* __restrict__ col_std, float* total) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < args.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = args.group_index[b];
    float sum = 0.f;
    bool any_valid = false;
    for (int64_t k = 0; k < args.num_rewards; ++k) {
      const float r = args.rewards[b * args.num_rewards + k];
      any_valid |= r == r;
      const float x = args.normalize_then_sum
                          ? (r - col_mean[g * args.num_rewards + k]) / (col_std[g * args.num_rewards + k] + args.eps)
                          : r;
      sum += x == x ? x * args.weights[k] : 0.f;
    }
    total[b] = any_valid ? sum : NAN;
  }
}

// Per group, beyond mean/std (estimators other than grpo): valid rows, opo's length-weighted baseline, grpo_passk's
// top two, written to extras = [count | baseline | top | second | top_count], G floats each.
__global__ void __launch_bounds__(256) group_sums_kernel(AdvantageArgs args, const float* __restrict__ total,
                                                         float* extras) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t G = args.num_groups;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; g < G; g += warps) {
    GroupSums s = group_sums_empty();
    for (int64_t i = args.cu_groups[g] + lane; i < args.cu_groups[g + 1]; i += 32) {
      const int64_t row = args.order[i];
      group_sums_push(s, total[row], args.lengths != nullptr ? args.lengths[row] : 0.f);
    }
    GK_UNROLL
    for (int offset = 16; offset > 0; offset >>= 1) {
      const GroupSums other{__shfl_xor_sync(0xffffffffu, s.count, offset),
                            __shfl_xor_sync(0xffffffffu, s.sum_len, offset),
                            __shfl_xor_sync(0xffffffffu, s.sum_len_t, offset),
                            __shfl_xor_sync(0xffffffffu, s.top, offset),
                            __shfl_xor_sync(0xffffffffu, s.second, offset),
                            __shfl_xor_sync(0xffffffffu, s.top_count, offset)};
      s = group_sums_merge(s, other);
    }
    if (lane == 0) {
      const GroupSummary summary = group_summary(0.f, 0.f, s);
      extras[g] = summary.count;
      extras[G + g] = summary.baseline;
      extras[2 * G + g] = summary.top;
      extras[3 * G + g] = summary.second;
      extras[4 * G + g] = summary.top_count;
    }
  }
}

// One warp over the batch: gpg's alpha (batch[2]) or reinforce_plus_plus_baseline's whitening mean and 1/std
// (batch[3], batch[4]), the latter from the centred totals of the rows with a baseline, weighted by their lengths.
__global__ void __launch_bounds__(32) batch_summary_kernel(AdvantageArgs args, const float* __restrict__ total,
                                                           const float* __restrict__ group_mean,
                                                           const float* __restrict__ extras, float* batch) {
  const int lane = threadIdx.x;
  if (args.estimator == AdvantageEstimator::kGpg) {
    double nonzero = 0.0;
    for (int64_t b = lane; b < args.batch; b += 32) nonzero += (total[b] == total[b] && total[b] != 0.f) ? 1.0 : 0.0;
    nonzero = warp_sum(nonzero);
    if (lane == 0) batch[2] = static_cast<float>(static_cast<double>(args.batch) / (nonzero > 1.0 ? nonzero : 1.0));
    return;
  }
  auto centred = [&](int64_t b) {
    const int64_t g = args.group_index[b];
    return centred_for_whitening(total[b], group_mean[g], extras[g]);
  };
  double weight = 0.0, sum = 0.0;
  for (int64_t b = lane; b < args.batch; b += 32) {
    const float c = centred(b);
    if (c == c) {
      weight += args.lengths[b];
      sum += static_cast<double>(args.lengths[b]) * c;
    }
  }
  weight = warp_sum(weight);
  sum = warp_sum(sum);
  const double mu = sum / weight;
  double squares = 0.0;
  for (int64_t b = lane; b < args.batch; b += 32) {
    const float c = centred(b);
    if (c == c) squares += static_cast<double>(args.lengths[b]) * (c - mu) * (c - mu);
  }
  squares = warp_sum(squares);
  if (lane == 0) whiten_stats(weight, sum, squares, batch[3], batch[4]);
}

// Per row: the advantage from its total, its group's statistics (extras: see group_sums_kernel; unused by grpo) and
// the batch statistics (batch[0] mean, [1] std of the totals, [2] gpg alpha, [3] / [4] whitening mean, 1/std).
__global__ void __launch_bounds__(256) advantages_kernel(AdvantageArgs args, const float* __restrict__ total,
                                                         const float* __restrict__ group_mean,
                                                         const float* __restrict__ group_std,
                                                         const float* __restrict__ extras,
                                                         const float* __restrict__ batch, float* advantages) {
  const int64_t G = args.num_groups;
  const bool grpo = args.estimator == AdvantageEstimator::kGrpo;
  const BatchSummary batch_summary{batch[0], batch[1], batch[2], batch[3], batch[4]};
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < args.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = args.group_index[b];
    const GroupSummary group =
        grpo ? GroupSummary{group_mean[g], group_std[g], 0.f, 0.f, 0.f, 0.f, 0.f}
             : GroupSummary{group_mean[g],     group_std[g],      extras[g],        extras[G + g],
                            extras[2 * G + g], extras[3 * G + g], extras[4 * G + g]};
    advantages[b] = row_advantage(args.estimator, args.scale, args.normalize_then_sum, args.eps, total[b], group,
                                  batch_summary);
  }
}

}  // namespace grpo_kernels
