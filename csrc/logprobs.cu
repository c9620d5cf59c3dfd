// Launchers of the token log-prob forward/backward (csrc/include/grpo_kernels/logprobs.cuh).
#include "grpo_kernels/dispatch.cuh"

namespace grpo_kernels {

cudaError_t token_logprobs_forward(const LogitsArg& logits, const int64_t* ids, double temperature, float* lp,
                                   float* lse, float* entropy, cudaStream_t stream) {
  if (logits.rows() == 0) return cudaSuccess;
  return dispatch_dtype(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_team(logits.vocab, [&](auto team) {
      constexpr int kTeam = decltype(team)::value;
      using Shape = TeamShape<kTeam>;
      const int blocks = grid_blocks(logits.rows(), Shape::kTeamsPerBlock, Shape::kThreads);
      row_forward_kernel<T, kTeam, LogprobsOutputs><<<blocks, Shape::kThreads, 0, stream>>>(
          rows_view<const T>(logits), ids, inverse_temperature(temperature), LogprobsOutputs{lp, lse, entropy});
      return cudaGetLastError();
    });
  });
}

cudaError_t token_logprobs_backward(const LogitsArg& logits, const LogitsArg& grad, const int64_t* ids,
                                    double temperature, const BackwardArgs& args, cudaStream_t stream) {
  if (logits.rows() == 0) return cudaSuccess;
  return dispatch_dtype(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_team(logits.vocab, [&](auto team) {
      constexpr int kTeam = decltype(team)::value;
      using Shape = TeamShape<kTeam>;
      const int blocks = grid_blocks(logits.rows(), Shape::kTeamsPerBlock, Shape::kThreads);
      row_backward_kernel<T, kTeam><<<blocks, Shape::kThreads, 0, stream>>>(
          rows_view<const T>(logits), rows_view<T>(grad), ids, inverse_temperature(temperature), args);
      return cudaGetLastError();
    });
  });
}

}  // namespace grpo_kernels
