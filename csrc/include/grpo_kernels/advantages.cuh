// Grouped advantages (docs/math.md section 2): NaN-aware group statistics, deterministic (no atomics).
//
// Groups arrive as runs of a sorted order (rows order[cu[g]:cu[g+1]] form group g), which covers both TRL's fixed
// groups (order = identity, cu = 0, G, 2G, ...) and arbitrary group ids. One warp owns a group: each lane walks a
// fixed subset of the members and the lanes combine with a fixed butterfly, in float64, so the same rewards give the
// same bits on every run. Batches are small (B ~ 10^3..10^4 rows), so the kernels are launch-bound, not
// bandwidth-bound: clarity over speed.
#pragma once

#include <cfloat>

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

// torch.nan_to_num(x, nan=0.0): NaN -> 0, +-inf -> +-FLT_MAX.
GK_DEVICE float nan_to_num(float x) {
  if (x != x) return 0.f;
  if (x == INFINITY) return FLT_MAX;
  if (x == -INFINITY) return -FLT_MAX;
  return x;
}

// Per row: the advantage from its total, its group's statistics and the batch statistics (batch[0] mean, [1] std).
__global__ void __launch_bounds__(256) advantages_kernel(AdvantageArgs args, const float* __restrict__ total,
                                                         const float* __restrict__ group_mean,
                                                         const float* __restrict__ group_std,
                                                         const float* __restrict__ batch, float* advantages) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < args.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = args.group_index[b];
    float adv;
    if (args.normalize_then_sum) {
      adv = (total[b] - batch[0]) / (batch[1] + args.eps);
    } else {
      const float centred = total[b] - group_mean[g];
      adv = args.scale == AdvantageScale::kGroup   ? centred / (group_std[g] + args.eps)
            : args.scale == AdvantageScale::kBatch ? centred / (batch[1] + args.eps)
                                                   : centred;
    }
    advantages[b] = nan_to_num(adv);
  }
}

}  // namespace grpo_kernels
