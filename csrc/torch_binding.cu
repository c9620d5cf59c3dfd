// The one file that knows torch: checks tensors, maps dtypes, takes the current CUDA stream and registers the
// kernels' launchers (csrc/include/grpo_kernels/launch.h) as ops of the `grpo_kernels_cuda` library.
//
// Ops mirror the Backend methods of grpo_kernels/backends/__init__.py; outputs are allocated by the Python side
// (grpo_kernels/_alloc.py, so tests can poison them) and passed in. grpo_kernels/backends/cuda.py is the caller.
#include <algorithm>
#include <iterator>
#include <utility>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grpo_kernels/launch.h"

namespace gk = grpo_kernels;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "grpo_kernels CUDA ", what, " failed: ", cudaGetErrorString(err));
}

gk::DType logits_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gk::DType::kFloat32;
    case at::kHalf:
      return gk::DType::kFloat16;
    case at::kBFloat16:
      return gk::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 on the CUDA backend, got ", t.scalar_type());
  }
}

// [B, T, V] with unit stride along V; any B/T strides.
gk::LogitsArg logits_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, name, " must be [B, T, V], got ", t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must have unit stride along V, got strides ", t.strides());
  return {t.data_ptr(), logits_dtype(t, name), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
}

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but logits are on ", logits.device());
}

// [n] contiguous tensor of `dtype` on the logits' device.
void check_vector(const at::Tensor& t, const at::Tensor& logits, const char* name, int64_t n, at::ScalarType dtype) {
  check_same_device(t, logits, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const float* optional_vector(const c10::optional<at::Tensor>& t, const at::Tensor& logits, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_vector(*t, logits, name, n, at::kFloat);
  return t->data_ptr<float>();
}

int64_t check_ids(const at::Tensor& logits, const at::Tensor& token_ids) {
  const int64_t n = logits.size(0) * logits.size(1);
  check_vector(token_ids, logits, "token_ids", n, at::kLong);
  return n;
}

void check_grad_like(const at::Tensor& grad, const at::Tensor& logits, const char* name) {
  check_same_device(grad, logits, name);
  TORCH_CHECK(grad.sizes() == logits.sizes(), name, " must have the logits' shape ", logits.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), name, " must have the logits' dtype ",
              logits.scalar_type(), ", got ", grad.scalar_type());
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

gk::LossParams loss_params(const std::string& loss_type, const std::string& kl_estimator, double beta,
                           double epsilon_low, double epsilon_high, c10::optional<double> delta,
                           c10::optional<double> dual_clip, double sapo_pos, double sapo_neg, bool bias_corrected) {
  int policy = gk::kPolicyClip;
  if (loss_type == "cispo") {
    policy = gk::kPolicyCispo;
  } else if (loss_type == "sapo") {
    policy = gk::kPolicySapo;
  } else {
    // The other loss types (vespo, geo_mean, gpg, clip_cov, kl_cov) have no epilogue here: grpo_kernels/backends/
    // cuda.py runs the log-prob kernel and grpo_kernels/loss_math.py for them.
    TORCH_CHECK(loss_type == "grpo" || loss_type == "bnpo" || loss_type == "dr_grpo" || loss_type == "dapo",
                "loss_type '", loss_type, "' has no fused CUDA epilogue (it has grpo, bnpo, dr_grpo, dapo, cispo, sapo)");
  }
  int kl = gk::kKlK3;
  if (kl_estimator == "k1") {
    kl = gk::kKlK1;
  } else if (kl_estimator == "k2") {
    kl = gk::kKlK2;
  } else if (kl_estimator == "low_var_kl") {
    kl = gk::kKlLowVar;
  } else {
    TORCH_CHECK(kl_estimator == "k3", "unknown kl_estimator '", kl_estimator, "'");
  }
  return gk::make_loss_params(policy, kl, beta, epsilon_low, epsilon_high, delta.has_value(), delta.value_or(0.0),
                              dual_clip.has_value(), dual_clip.value_or(0.0), sapo_pos, sapo_neg, bias_corrected);
}

// ---------------------------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------------------------
void token_logprobs_forward(const at::Tensor& logits, const at::Tensor& token_ids, double temperature, at::Tensor& lp,
                            at::Tensor& lse, at::Tensor& entropy) {
  const gk::LogitsArg z = logits_arg(logits, "logits");
  const int64_t n = check_ids(logits, token_ids);
  check_vector(lp, logits, "lp", n, at::kFloat);
  check_vector(lse, logits, "lse", n, at::kFloat);
  const bool with_entropy = entropy.numel() != 0;
  if (with_entropy) check_vector(entropy, logits, "entropy", n, at::kFloat);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda(gk::token_logprobs_forward(z, token_ids.data_ptr<int64_t>(), temperature, lp.data_ptr<float>(),
                                        lse.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                                        stream_of(logits)),
             "token_logprobs_forward");
}

void token_logprobs_backward(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,
                             const at::Tensor& entropy, const at::Tensor& grad_lp,
                             const c10::optional<at::Tensor>& grad_entropy, double temperature, at::Tensor& out) {
  const gk::LogitsArg z = logits_arg(logits, "logits");
  check_grad_like(out, logits, "out");
  const gk::LogitsArg dz = logits_arg(out, "out");
  const int64_t n = check_ids(logits, token_ids);
  check_vector(lse, logits, "lse", n, at::kFloat);
  check_vector(grad_lp, logits, "grad_lp", n, at::kFloat);
  const float* d_entropy = optional_vector(grad_entropy, logits, "grad_entropy", n);
  if (d_entropy != nullptr) check_vector(entropy, logits, "entropy", n, at::kFloat);
  const gk::BackwardArgs args{lse.data_ptr<float>(), d_entropy != nullptr ? entropy.data_ptr<float>() : nullptr,
                              grad_lp.data_ptr<float>(), d_entropy, 1.f};
  const c10::cuda::CUDAGuard guard(logits.device());
  check_cuda(gk::token_logprobs_backward(z, dz, token_ids.data_ptr<int64_t>(), temperature, args, stream_of(logits)),
             "token_logprobs_backward");
}

// Token-level fused loss. With grad_logits: also writes loss_scale * d loss / d logits there (may be the logits
// themselves) and returns the number of passes over memory it took (2 on sm_90, else 3); without: returns 1.
int64_t grpo_loss_forward(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& coef,
                          const at::Tensor& advantages, const c10::optional<at::Tensor>& old_logprobs,
                          const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& is_weights,
                          const std::string& loss_type, const std::string& kl_estimator, double beta,
                          double epsilon_low, double epsilon_high, c10::optional<double> delta,
                          c10::optional<double> dual_clip, double temperature, double sapo_temperature_pos,
                          double sapo_temperature_neg, bool bias_corrected_kl, at::Tensor& lp, at::Tensor& lse,
                          at::Tensor& entropy, at::Tensor& grad_lp, at::Tensor& per_token_loss, at::Tensor& kl,
                          at::Tensor& flags, double loss_scale, const c10::optional<at::Tensor>& grad_logits) {
  const gk::LogitsArg z = logits_arg(logits, "logits");
  const int64_t n = check_ids(logits, token_ids);
  const gk::LossParams params = loss_params(loss_type, kl_estimator, beta, epsilon_low, epsilon_high, delta, dual_clip,
                                            sapo_temperature_pos, sapo_temperature_neg, bias_corrected_kl);
  check_vector(coef, logits, "coef", n, at::kFloat);
  check_vector(advantages, logits, "advantages", n, at::kFloat);
  TORCH_CHECK(beta == 0.0 || ref_logprobs.has_value(), "beta != 0 needs ref_logprobs");
  const gk::TokenArgs tokens{coef.data_ptr<float>(), advantages.data_ptr<float>(),
                             optional_vector(old_logprobs, logits, "old_logprobs", n),
                             optional_vector(ref_logprobs, logits, "ref_logprobs", n),
                             optional_vector(is_weights, logits, "is_weights", n)};
  for (const auto* t : {&lp, &lse, &grad_lp, &per_token_loss, &kl}) check_vector(*t, logits, "output", n, at::kFloat);
  check_vector(flags, logits, "flags", n, at::kByte);
  const bool with_entropy = entropy.numel() != 0;
  if (with_entropy) check_vector(entropy, logits, "entropy", n, at::kFloat);
  const gk::TokenOutputs out{lp.data_ptr<float>(),       lse.data_ptr<float>(),
                             with_entropy ? entropy.data_ptr<float>() : nullptr,
                             grad_lp.data_ptr<float>(),  per_token_loss.data_ptr<float>(),
                             kl.data_ptr<float>(),       flags.data_ptr<uint8_t>()};
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = stream_of(logits);
  if (!grad_logits.has_value()) {
    check_cuda(gk::grpo_loss_forward(z, token_ids.data_ptr<int64_t>(), temperature, tokens, params, out, stream),
               "grpo_loss_forward");
    return 1;
  }
  check_grad_like(*grad_logits, logits, "grad_logits");
  TORCH_CHECK(std::isfinite(loss_scale) && loss_scale != 0.0, "loss_scale must be finite and != 0, got ", loss_scale);
  gk::GradPath path = gk::GradPath::kThreePass;
  check_cuda(gk::grpo_loss_forward_with_grad(z, token_ids.data_ptr<int64_t>(), temperature, tokens, params, out,
                                             static_cast<float>(loss_scale), logits_arg(*grad_logits, "grad_logits"),
                                             stream, &path),
             "grpo_loss_forward_with_grad");
  return static_cast<int64_t>(path);
}

// grad *= grad_loss / loss_scale where they differ (decided on the device).
void scale_gradient_(at::Tensor& grad, const at::Tensor& grad_loss, double loss_scale) {
  const gk::LogitsArg dz = logits_arg(grad, "grad");
  check_vector(grad_loss, grad, "grad_loss", 1, at::kFloat);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_cuda(gk::scale_gradient(dz, grad_loss.data_ptr<float>(), static_cast<float>(loss_scale), stream_of(grad)),
             "scale_gradient");
}

// Cluster size of the 2-pass kernel for these tensors on their device (0: it does not apply, 3 passes).
int64_t two_pass_cluster_size(const at::Tensor& logits, const at::Tensor& grad) {
  check_grad_like(grad, logits, "grad");
  return gk::two_pass_cluster_size(logits_arg(logits, "logits"), logits_arg(grad, "grad"), logits.device().index());
}

void group_advantages(const at::Tensor& rewards, const at::Tensor& weights, const at::Tensor& order,
                      const at::Tensor& cu_groups, const at::Tensor& group_index, const std::string& scale, double eps,
                      const std::string& multi_reward, const std::string& estimator,
                      const c10::optional<at::Tensor>& lengths, at::Tensor& advantages, at::Tensor& group_mean,
                      at::Tensor& group_std) {
  TORCH_CHECK(rewards.is_cuda(), "rewards must be a CUDA tensor, got ", rewards.device());
  TORCH_CHECK(rewards.dim() == 2 && rewards.is_contiguous() && rewards.scalar_type() == at::kFloat,
              "rewards must be a contiguous float32 [B, R] tensor, got ", rewards.scalar_type(), " ", rewards.sizes());
  const int64_t batch = rewards.size(0), num_rewards = rewards.size(1), num_groups = cu_groups.size(0) - 1;
  check_vector(weights, rewards, "weights", num_rewards, at::kFloat);
  check_vector(order, rewards, "order", batch, at::kLong);
  check_vector(cu_groups, rewards, "cu_groups", num_groups + 1, at::kLong);
  check_vector(group_index, rewards, "group_index", batch, at::kLong);
  check_vector(advantages, rewards, "advantages", batch, at::kFloat);
  check_vector(group_mean, rewards, "group_mean", num_groups, at::kFloat);
  check_vector(group_std, rewards, "group_std", num_groups, at::kFloat);
  gk::AdvantageScale mode = gk::AdvantageScale::kGroup;
  if (scale == "batch") {
    mode = gk::AdvantageScale::kBatch;
  } else if (scale == "none") {
    mode = gk::AdvantageScale::kNone;
  } else {
    TORCH_CHECK(scale == "group", "unknown scale '", scale, "'");
  }
  TORCH_CHECK(multi_reward == "sum_then_normalize" || multi_reward == "normalize_then_sum", "unknown multi_reward '",
              multi_reward, "'");
  static const std::pair<const char*, gk::AdvantageEstimator> kEstimators[] = {
      {"grpo", gk::AdvantageEstimator::kGrpo},
      {"rloo", gk::AdvantageEstimator::kRloo},
      {"grpo_passk", gk::AdvantageEstimator::kGrpoPassk},
      {"reinforce_plus_plus_baseline", gk::AdvantageEstimator::kReinforcePlusPlusBaseline},
      {"opo", gk::AdvantageEstimator::kOpo},
      {"gpg", gk::AdvantageEstimator::kGpg},
  };
  const auto found = std::find_if(std::begin(kEstimators), std::end(kEstimators),
                                  [&](const auto& e) { return estimator == e.first; });
  TORCH_CHECK(found != std::end(kEstimators), "unknown estimator '", estimator, "'");
  const bool needs_lengths = found->second == gk::AdvantageEstimator::kOpo ||
                             found->second == gk::AdvantageEstimator::kReinforcePlusPlusBaseline;
  TORCH_CHECK(!needs_lengths || lengths.has_value(), "estimator '", estimator, "' needs lengths");
  const float* lengths_data = optional_vector(lengths, rewards, "lengths", batch);
  const gk::AdvantageArgs args{rewards.data_ptr<float>(),
                               weights.data_ptr<float>(),
                               order.data_ptr<int64_t>(),
                               cu_groups.data_ptr<int64_t>(),
                               group_index.data_ptr<int64_t>(),
                               batch,
                               num_rewards,
                               num_groups,
                               mode,
                               static_cast<float>(eps),
                               multi_reward == "normalize_then_sum",
                               found->second,
                               lengths_data};
  at::Tensor workspace =
      at::empty({gk::advantage_workspace_floats(batch, num_rewards, num_groups)}, rewards.options());
  const gk::AdvantageOutputs out{advantages.data_ptr<float>(), group_mean.data_ptr<float>(),
                                 group_std.data_ptr<float>(), workspace.data_ptr<float>()};
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_cuda(gk::group_advantages(args, out, stream_of(rewards)), "group_advantages");
}

}  // namespace

TORCH_LIBRARY(grpo_kernels_cuda, m) {
  m.def(
      "token_logprobs_forward(Tensor logits, Tensor token_ids, float temperature, Tensor(a!) lp, Tensor(b!) lse, "
      "Tensor(c!) entropy) -> ()");
  m.def(
      "token_logprobs_backward(Tensor logits, Tensor token_ids, Tensor lse, Tensor entropy, Tensor grad_lp, "
      "Tensor? grad_entropy, float temperature, Tensor(a!) out) -> ()");
  m.def(
      "grpo_loss_forward(Tensor logits, Tensor token_ids, Tensor coef, Tensor advantages, Tensor? old_logprobs, "
      "Tensor? ref_logprobs, Tensor? is_weights, str loss_type, str kl_estimator, float beta, float epsilon_low, "
      "float epsilon_high, float? delta, float? dual_clip, float temperature, float sapo_temperature_pos, "
      "float sapo_temperature_neg, bool bias_corrected_kl, Tensor(a!) lp, Tensor(b!) lse, Tensor(c!) entropy, "
      "Tensor(d!) grad_lp, Tensor(e!) per_token_loss, Tensor(f!) kl, Tensor(g!) flags, float loss_scale, "
      "Tensor(h!)? grad_logits) -> int");
  m.def("scale_gradient_(Tensor(a!) grad, Tensor grad_loss, float loss_scale) -> ()");
  m.def("two_pass_cluster_size(Tensor logits, Tensor grad) -> int");
  m.def(
      "group_advantages(Tensor rewards, Tensor weights, Tensor order, Tensor cu_groups, Tensor group_index, "
      "str scale, float eps, str multi_reward, str estimator, Tensor? lengths, Tensor(a!) advantages, "
      "Tensor(b!) group_mean, Tensor(c!) group_std) -> ()");
}

TORCH_LIBRARY_IMPL(grpo_kernels_cuda, CUDA, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward);
  m.impl("token_logprobs_backward", &token_logprobs_backward);
  m.impl("grpo_loss_forward", &grpo_loss_forward);
  m.impl("scale_gradient_", &scale_gradient_);
  m.impl("two_pass_cluster_size", &two_pass_cluster_size);
  m.impl("group_advantages", &group_advantages);
}
