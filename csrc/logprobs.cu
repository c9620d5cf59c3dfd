// Launchers of the token log-prob forward/backward (csrc/include/grpo_kernels/logprobs.cuh).
#include "grpo_kernels/dispatch.cuh"

namespace grpo_kernels {

cudaError_t token_logprobs_forward(const LogitsArg& logits, const int64_t* ids, double temperature, float* lp,
                                   float* lse, float* entropy, cudaStream_t stream) {
  return launch_rows(logits, [&](auto tag, auto team, dim3 grid, dim3 block) {
    using T = decltype(tag);
    row_forward_kernel<T, decltype(team)::value, LogprobsOutputs><<<grid, block, 0, stream>>>(
        rows_view<const T>(logits), ids, inverse_temperature(temperature), LogprobsOutputs{lp, lse, entropy});
  });
}

cudaError_t token_logprobs_backward(const LogitsArg& logits, const LogitsArg& grad, const int64_t* ids,
                                    double temperature, const BackwardArgs& args, cudaStream_t stream) {
  return launch_rows(logits, [&](auto tag, auto team, dim3 grid, dim3 block) {
    using T = decltype(tag);
    row_backward_kernel<T, decltype(team)::value><<<grid, block, 0, stream>>>(
        rows_view<const T>(logits), rows_view<T>(grad), ids, inverse_temperature(temperature), args);
  });
}

}  // namespace grpo_kernels
