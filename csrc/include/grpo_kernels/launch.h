// The framework-free host API of the kernels: plain structs of pointers, shapes and strides, and one launcher per
// op. csrc/*.cu implement these (compiled without torch, so CI can compile them on a machine without a GPU);
// csrc/torch_binding.cu checks torch tensors and calls them on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "advantage_math.cuh"
#include "row_math.cuh"

namespace grpo_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// [B, T, V] with unit stride along V; strides in elements. Row n = (n / T, n % T).
struct LogitsArg {
  void* data;
  DType dtype;
  int64_t batch;     // B
  int64_t seq_len;   // T
  int64_t vocab;     // V
  int64_t stride_b;  // elements
  int64_t stride_t;  // elements

  int64_t rows() const { return batch * seq_len; }
};

// Per-row inputs of the backward: d/dz of sum_n (g_n lp_n + gH_n H_n), g scaled by grad_scale.
struct BackwardArgs {
  const float* lse;           // [N]
  const float* entropy;       // [N]; read only with grad_entropy
  const float* grad_lp;       // [N] g
  const float* grad_entropy;  // [N] gH, or nullptr
  float grad_scale;           // multiplies g (1, or the loss scale of the 2-pass path)
};

// Per-token inputs of the fused loss ([N] float32; optional ones may be nullptr).
struct TokenArgs {
  const float* coef;          // aggregation coefficient c_t (loss = sum_t c_t L_t)
  const float* advantages;    // A_t
  const float* old_logprobs;  // lp_old, or nullptr (ratio 1, gradient kept)
  const float* ref_logprobs;  // lp_ref, read only when beta != 0
  const float* is_weights;    // w_t, or nullptr
};

// Per-token outputs of the fused loss ([N]).
struct TokenOutputs {
  float* lp;
  float* lse;
  float* entropy;  // nullptr when not asked for
  float* grad_lp;  // g_t = d loss / d lp_t (unscaled)
  float* per_token_loss;
  float* kl;
  uint8_t* flags;  // kClipLow | kClipHigh
};

// lp, lse (and entropy unless nullptr) of every row; rows with ids[n] < 0 get zeros and are never read.
cudaError_t token_logprobs_forward(const LogitsArg& logits, const int64_t* ids, double temperature, float* lp,
                                   float* lse, float* entropy, cudaStream_t stream);

// grad (shape of logits, may be the logits themselves) = d/dz; rows with ids[n] < 0 get zeros.
cudaError_t token_logprobs_backward(const LogitsArg& logits, const LogitsArg& grad, const int64_t* ids,
                                    double temperature, const BackwardArgs& args, cudaStream_t stream);

// Token-level fused loss: log-probs plus the per-token epilogue in one read of the logits.
cudaError_t grpo_loss_forward(const LogitsArg& logits, const int64_t* ids, double temperature, const TokenArgs& tokens,
                              const LossParams& params, const TokenOutputs& out, cudaStream_t stream);

// How grpo_loss_forward_with_grad ran.
enum class GradPath : int { kTwoPassCluster = 2, kThreePass = 3 };

// Token-level fused loss that also writes grad = loss_scale * d loss / d logits (over the logits when grad.data ==
// logits.data). On sm_90 with 16-byte aligned rows and a row that fits a cluster's shared memory: 2 passes (read the
// logits once, write the gradient once). Elsewhere: forward then backward, 3 passes. *path says which ran.
cudaError_t grpo_loss_forward_with_grad(const LogitsArg& logits, const int64_t* ids, double temperature,
                                        const TokenArgs& tokens, const LossParams& params, const TokenOutputs& out,
                                        float loss_scale, const LogitsArg& grad, cudaStream_t stream, GradPath* path);

// grad *= grad_loss[0] / loss_scale, where grad_loss != loss_scale; otherwise the kernel exits without touching grad
// (decided on the device: no host synchronisation).
cudaError_t scale_gradient(const LogitsArg& grad, const float* grad_loss, float loss_scale, cudaStream_t stream);

// The 2-pass kernel on this device for these shapes: the cluster size it would use, or 0 when it does not apply.
int two_pass_cluster_size(const LogitsArg& logits, const LogitsArg& grad, int device);

// Grouped advantages (docs/math.md section 2, docs/math.md section 10). Groups are runs of a sorted order: rows
// order[cu[g]:cu[g+1]] form group g. AdvantageScale / AdvantageEstimator: advantage_math.cuh.
struct AdvantageArgs {
  const float* rewards;      // [B, R] row-major
  const float* weights;      // [R]
  const int64_t* order;        // [B] rows sorted by group
  const int64_t* cu_groups;    // [G + 1]
  const int64_t* group_index;  // [B] group of each row
  int64_t batch;             // B
  int64_t num_rewards;       // R
  int64_t num_groups;        // G
  AdvantageScale scale;
  float eps;
  bool normalize_then_sum;   // else sum_then_normalize
  AdvantageEstimator estimator;
  const float* lengths;      // [B] completion lengths (opo, reinforce_plus_plus_baseline); else nullptr
};
struct AdvantageOutputs {
  float* advantages;  // [B]
  float* group_mean;  // [G]
  float* group_std;   // [G]
  float* workspace;   // advantage_workspace_floats(B, R, G) floats
};
int64_t advantage_workspace_floats(int64_t batch, int64_t num_rewards, int64_t num_groups);
cudaError_t group_advantages(const AdvantageArgs& args, const AdvantageOutputs& out, cudaStream_t stream);

}  // namespace grpo_kernels
