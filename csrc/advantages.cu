// Launcher of the grouped advantages (csrc/include/grpo_kernels/advantages.cuh).
#include <algorithm>

#include "grpo_kernels/advantages.cuh"

namespace grpo_kernels {

// totals [B] | column means [G, R] | column stds [G, R] | batch summary [5] | group extras [5 G]
int64_t advantage_workspace_floats(int64_t batch, int64_t num_rewards, int64_t num_groups) {
  return batch + 2 * num_groups * num_rewards + 5 + 5 * num_groups;
}

namespace {

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 65535)));
}

}  // namespace

cudaError_t group_advantages(const AdvantageArgs& args, const AdvantageOutputs& out, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  const int64_t B = args.batch, R = args.num_rewards, G = args.num_groups;
  float* total = out.workspace;
  float* col_mean = total + B;
  float* col_std = col_mean + G * R;
  float* batch_stats = col_std + G * R;
  float* extras = batch_stats + 5;
  const bool grpo = args.estimator == AdvantageEstimator::kGrpo;
  constexpr int kThreads = 256, kWarps = kThreads / 32;

  if (args.normalize_then_sum) {  // each reward column's statistics per group
    for (int64_t k = 0; k < R; ++k) {
      group_stats_kernel<<<blocks_for(G, kWarps), kThreads, 0, stream>>>(args.rewards + k, R, args.order, args.cu_groups,
                                                                         G, B, col_mean + k, col_std + k, R);
    }
  }
  row_totals_kernel<<<blocks_for(B, kThreads), kThreads, 0, stream>>>(args, col_mean, col_std, total);
  group_stats_kernel<<<blocks_for(G, kWarps), kThreads, 0, stream>>>(total, 1, args.order, args.cu_groups, G, B,
                                                                     out.group_mean, out.group_std, 1);
  if (!grpo) group_sums_kernel<<<blocks_for(G, kWarps), kThreads, 0, stream>>>(args, total, extras);
  if (args.normalize_then_sum || args.scale == AdvantageScale::kBatch) {
    group_stats_kernel<<<1, 32, 0, stream>>>(total, 1, nullptr, nullptr, 1, B, batch_stats, batch_stats + 1, 1);
  }
  if (args.estimator == AdvantageEstimator::kGpg || args.estimator == AdvantageEstimator::kReinforcePlusPlusBaseline) {
    batch_summary_kernel<<<1, 32, 0, stream>>>(args, total, out.group_mean, extras, batch_stats);
  }
  advantages_kernel<<<blocks_for(B, kThreads), kThreads, 0, stream>>>(args, total, out.group_mean, out.group_std,
                                                                      extras, batch_stats, out.advantages);
  return cudaGetLastError();
}

}  // namespace grpo_kernels
