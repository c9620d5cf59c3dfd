// The fused GRPO loss, token level: the log-prob forward of logprobs.cuh with the per-token epilogue of
// row_math.cuh (ratio, policy term, IS weight, KL, g_t) in the same kernel. The backward is the log-prob backward
// driven by g_t. Sequence-level ratios (GSPO) need a per-sequence sum of d L / d log rho between the passes: the
// CUDA backend computes lp with logprobs.cuh and does that [N]-sized math in torch (grpo_kernels/loss_math.py).
#pragma once

#include "logprobs.cuh"

namespace grpo_kernels {

// Forward outputs of the fused loss, written once per row.
struct GrpoOutputs {
  TokenArgs in;
  LossParams params;
  TokenOutputs out;

  // g_t of row n (0 when it does not take part); with `store`, also writes every per-token output of the row.
  GK_DEVICE float epilogue(int64_t n, bool valid, float lp, float lse, float entropy, bool store) const {
    if (!valid) {
      if (store) {
        out.lp[n] = out.lse[n] = out.grad_lp[n] = out.per_token_loss[n] = out.kl[n] = 0.f;
        if (out.entropy != nullptr) out.entropy[n] = 0.f;
        out.flags[n] = 0;
      }
      return 0.f;
    }
    // lp_old absent: stop_grad(lp), so lp - lp (not a constant 0: a NaN log-prob must reach the loss)
    const float log_ratio = lp - (in.old_logprobs != nullptr ? in.old_logprobs[n] : lp);
    const float ref = params.beta != 0.f ? in.ref_logprobs[n] : 0.f;
    const bool has_w = in.is_weights != nullptr;
    const TokenTerms t = token_terms(lp, log_ratio, in.advantages[n], ref, has_w ? in.is_weights[n] : 1.f, has_w, params);
    const float g = in.coef[n] * t.d_token;
    if (store) {
      out.lp[n] = lp;
      out.lse[n] = lse;
      if (out.entropy != nullptr) out.entropy[n] = entropy;
      out.grad_lp[n] = g;
      out.per_token_loss[n] = t.loss;
      out.kl[n] = t.kl;
      out.flags[n] = t.flags;
    }
    return g;
  }

  GK_DEVICE void write(int64_t n, bool valid, float lp, float lse, float entropy) const {
    epilogue(n, valid, lp, lse, entropy, true);
  }
};

// grad *= grad_loss / loss_scale unless they are equal. The check runs on the device, so the common case (the loss
// scale the forward baked in is the grad_output autograd brings) costs one launch and no pass over grad.
template <typename T>
__global__ void __launch_bounds__(256) scale_gradient_kernel(RowsView<T> grad, const float* __restrict__ grad_loss,
                                                             float loss_scale) {
  const float incoming = *grad_loss;
  if (incoming == loss_scale) return;
  const float factor = incoming / loss_scale;  // NaN grad_output -> NaN gradient, as autograd would give
  const TeamRows<256> team = TeamRows<256>::make();
  for (int64_t n = team.first; n < grad.rows; n += team.step) {
    T* row = grad.row(n);
    for (int64_t v = team.rank; v < grad.vocab; v += 256) row[v] = from_float<T>(to_float(row[v]) * factor);
  }
}

}  // namespace grpo_kernels
