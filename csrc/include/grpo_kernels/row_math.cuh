// The per-row and per-token math of every kernel, as __host__ __device__ inline functions.
//
// Framework-free and compilable as plain C++ (tests/test_cuda_host_math.py builds it with g++ and compares it with
// grpo_kernels.reference / grpo_kernels.loss_math). The formulas are docs/math.md:
//
//   u_v = z_v / tau,   lse = log sum_v exp(u_v),   lp = u_y - lse,   H = lse - sum_v p_v u_v
//   d(g lp + gH H)/dz_v = (g 1[v = y] - p_v (g + gH (log p_v + H))) / tau
//
// and the per-token epilogue of grpo_kernels/loss_math.py (ratio, clip family, cispo, sapo, KL, IS weight, g_t).
#pragma once

#include "platform.cuh"

namespace grpo_kernels {

// ---------------------------------------------------------------------------------------------------------------
// Online log-sum-exp with the entropy term
// ---------------------------------------------------------------------------------------------------------------
// Over a set of values u: m = max u, s = sum exp(u - m), t = sum exp(u - m) (u - m). Then
//   lse = m + log s,   sum_v p_v u_v = m + t / s,   H = log s - t / s.
// Keeping t relative to m makes H exact for rows whose logits are far from 0 (no lse - E[u] cancellation).
struct LseState {
  float m;  // running max (-inf while empty)
  float s;  // sum exp(u - m)
  float t;  // sum exp(u - m) (u - m)
};

GK_HOST_DEVICE LseState lse_empty() { return {-INFINITY, 0.f, 0.f}; }

// Re-express the sums relative to new_max (>= st.m). An empty state has nothing to rescale, and must not compute
// (-inf) - (-inf).
GK_HOST_DEVICE void lse_rescale(LseState& st, float new_max) {
  if (st.s != 0.f) {  // NaN s is rescaled too, and stays NaN
    const float shift = st.m - new_max;
    const float scale = exp_f32(shift);
    st.t = scale * (st.t + shift * st.s);
    st.s = scale * st.s;
  }
  st.m = new_max;
}

// Add one value u <= st.m. A -inf entry (a masked-out vocabulary id) contributes exp(-inf) = 0 and 0 log 0 = 0;
// a NaN entry makes s NaN, so the row's lse, lp and H come out NaN, as in the reference.
GK_HOST_DEVICE void lse_add(LseState& st, float u) {
  const float d = u - st.m;
  const float e = u == -INFINITY ? 0.f : exp_f32(d);
  st.s += e;
  st.t += e > 0.f ? e * d : 0.f;
}

// Add K values with one rescale: the vectorised loops call this once per 16-byte load.
template <int K>
GK_HOST_DEVICE void lse_push(LseState& st, const float (&u)[K]) {
  float chunk_max = u[0];
GK_UNROLL
  for (int i = 1; i < K; ++i) chunk_max = fmaxf(chunk_max, u[i]);  // fmaxf drops NaN here; lse_add catches it
  if (chunk_max > st.m) lse_rescale(st, chunk_max);
GK_UNROLL
  for (int i = 0; i < K; ++i) lse_add(st, u[i]);
}

GK_HOST_DEVICE void lse_push(LseState& st, float u) {
  if (u > st.m) lse_rescale(st, u);
  lse_add(st, u);
}

// Merge two partial states (disjoint sets of values). Rounding depends on the order, so reductions merge in a
// fixed order: the same inputs give the same bits on every run.
GK_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  const float m = fmaxf(a.m, b.m);
  lse_rescale(a, m);
  lse_rescale(b, m);
  return {m, a.s + b.s, a.t + b.t};
}

GK_HOST_DEVICE float lse_value(const LseState& st) { return st.m + log_f32(st.s); }
GK_HOST_DEVICE float lse_entropy(const LseState& st) { return log_f32(st.s) - st.t / st.s; }

// ---------------------------------------------------------------------------------------------------------------
// Gradient of g lp + gH H w.r.t. one logit, with the 1/tau folded in: a = g / tau, b = gH / tau.
//   a 1[v = y] - p_v (a + b (log p_v + H))
// p_v = 0 (u_v = -inf) contributes 0 (0 log 0 = 0); NaN in a valid row reaches every element.
// ---------------------------------------------------------------------------------------------------------------
GK_HOST_DEVICE float logit_grad(float u, bool is_target, float lse, float entropy, float a, float b) {
  const float logp = u - lse;
  const float p = exp_f32(logp);
  const float spread = p == 0.f ? 0.f : p * (a + b * (logp + entropy));
  return (is_target ? a : 0.f) - spread;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-token GRPO epilogue (grpo_kernels/loss_math.py: policy_and_grads, kl_and_grad, loss_forward_from_logprobs)
// ---------------------------------------------------------------------------------------------------------------
enum PolicyForm : int { kPolicyClip = 0, kPolicyCispo = 1, kPolicySapo = 2 };
enum KlEstimator : int { kKlK3 = 0, kKlK1 = 1, kKlK2 = 2, kKlLowVar = 3 };
enum ClipFlag : uint8_t { kClipLow = 1, kClipHigh = 2 };  // loss_math.CLIP_LOW / CLIP_HIGH

// Scalar hyper-parameters, rounded to float32 once on the host (as torch rounds a Python scalar it combines with a
// float32 tensor), so that comparisons such as rho < 1 - eps_low see the same threshold as the torch backend.
struct LossParams {
  int policy;            // PolicyForm
  int kl_estimator;      // KlEstimator
  float beta;            // KL coefficient; 0 = no KL work, ref_logprobs unused
  float clip_low;        // 1 - epsilon_low
  float clip_high;       // 1 + epsilon_high
  float epsilon_high;    // cispo caps the ratio itself at epsilon_high
  float delta;           // two-sided clip (INTELLECT-2), used when has_delta
  float dual_clip;       // c > 1 (verl), used when has_dual_clip
  float sapo_tau_pos;    // sapo temperature for A > 0
  float sapo_tau_neg;    // sapo temperature for A <= 0
  bool has_delta;
  bool has_dual_clip;
  bool bias_corrected_kl;  // KL *= rho (gradient through rho kept)
};

// Host side: the API's doubles -> LossParams. Each threshold is computed in double and rounded once, as Python
// computes 1 - epsilon_low before torch rounds it to the tensor's float32.
inline LossParams make_loss_params(int policy, int kl_estimator, double beta, double epsilon_low, double epsilon_high,
                                   bool has_delta, double delta, bool has_dual_clip, double dual_clip,
                                   double sapo_tau_pos, double sapo_tau_neg, bool bias_corrected_kl) {
  LossParams p;
  p.policy = policy;
  p.kl_estimator = kl_estimator;
  p.beta = static_cast<float>(beta);
  p.clip_low = static_cast<float>(1.0 - epsilon_low);
  p.clip_high = static_cast<float>(1.0 + epsilon_high);
  p.epsilon_high = static_cast<float>(epsilon_high);
  p.delta = static_cast<float>(has_delta ? delta : 0.0);
  p.dual_clip = static_cast<float>(has_dual_clip ? dual_clip : 0.0);
  p.sapo_tau_pos = static_cast<float>(sapo_tau_pos);
  p.sapo_tau_neg = static_cast<float>(sapo_tau_neg);
  p.has_delta = has_delta;
  p.has_dual_clip = has_dual_clip;
  p.bias_corrected_kl = bias_corrected_kl;
  return p;
}

// d min(a, b): at a tie both sides share it equally, as torch.minimum's gradient does.
GK_HOST_DEVICE float min_grad(float a, float b, float da, float db) {
  return a < b ? da : (a > b ? db : 0.5f * (da + db));
}

struct PolicyTerms {
  float value;      // P
  float d_ratio;    // dP / d log rho
  float d_logprob;  // dP / d lp, direct (cispo only)
};

// docs/math.md section 4, before IS weights and KL, for ratio rho = exp(r).
GK_HOST_DEVICE PolicyTerms policy_terms(float rho, float adv, float lp, const LossParams& p) {
  if (p.policy == kPolicyCispo) {
    const float capped = clamp_max(rho, p.epsilon_high);  // stop-gradient: no dP/dr
    return {-capped * adv * lp, 0.f, -capped * adv};
  }
  if (p.policy == kPolicySapo) {
    const float tau = adv > 0.f ? p.sapo_tau_pos : p.sapo_tau_neg;
    const float x = tau * (rho - 1.f);
    const float s = 1.f / (1.f + exp_f32(-x));
    // s (1 - s) with 1 - s as sigmoid(-x): no cancellation when s rounds to 1; 0 once it saturates, also when rho
    // overflows (r > 88.7), where 0 * inf would put a NaN gradient under a finite loss
    const float slope = s * (1.f / (1.f + exp_f32(x)));
    return {-(4.f / tau) * s * adv, slope > 0.f ? -4.f * slope * rho * adv : 0.f, 0.f};
  }
  // clip family: P = -min(rho1 A, rho2 A), d rho / d r = rho where the clamp passes
  const float rho2 = clamp_range(rho, p.clip_low, p.clip_high);
  const float drho2 = (rho >= p.clip_low && rho <= p.clip_high) ? rho : 0.f;
  float rho1 = rho, drho1 = rho;
  if (p.has_delta) {
    rho1 = clamp_max(rho, p.delta);
    drho1 = rho <= p.delta ? rho : 0.f;
  }
  const float a = rho1 * adv, b = rho2 * adv;
  float value = -nan_min(a, b);
  float d_ratio = -min_grad(a, b, drho1 * adv, drho2 * adv);
  if (p.has_dual_clip && adv < 0.f) {  // L = min(L, -c A)
    const float floor = -p.dual_clip * adv;
    d_ratio = min_grad(value, floor, d_ratio, 0.f);
    value = nan_min(value, floor);
  }
  return {value, d_ratio, 0.f};
}

struct KlTerms {
  float value;          // K
  float d_logprob;      // dK / d lp
  float value_plus_d;   // K + dK / d lp in closed form (for k3 the sum cancels: (e^k - k - 1) + (1 - e^k) = -k)
};

// docs/math.md section 5, from k = lp_ref - lp.
GK_HOST_DEVICE KlTerms kl_terms(float lp, float ref, int estimator) {
  const float k = ref - lp;
  if (estimator == kKlK1) return {-k, 1.f, 1.f - k};
  if (estimator == kKlK2) return {0.5f * k * k, -k, 0.5f * k * k - k};
  if (estimator == kKlLowVar) {  // the clamps' gradients pass at their bounds, as torch.clamp's do
    const float kc = clamp_range(k, -20.f, 20.f);
    const float ekc = exp_f32(kc);
    const float raw = ekc - kc - 1.f;
    const bool passes = k >= -20.f && k <= 20.f && raw <= 10.f;
    const float value = clamp_range(raw, -10.f, 10.f);
    return {value, passes ? 1.f - ekc : 0.f, passes ? -kc : value};
  }
  const float ek = exp_f32(k);  // k3
  return {ek - k - 1.f, 1.f - ek, -k};
}

struct TokenTerms {
  float loss;       // L_t = w P + beta K (rho)
  float d_ratio;    // dL_t / d log rho
  float d_logprob;  // dL_t / d lp_t, direct
  float d_token;    // token level (d log rho / d lp = 1): dL_t / d lp_t in all, d_ratio + d_logprob without the
                    // cancellation of the bias-corrected KL's two parts
  float kl;         // K_t after bias correction (0 when beta == 0)
  uint8_t flags;    // kClipLow | kClipHigh
};

// Everything of one token that does not need its sequence: the token-level g_t is coef * d_token; at sequence
// level d_ratio is first summed over the sequence (loss_math.py).
GK_HOST_DEVICE TokenTerms token_terms(float lp, float log_ratio, float adv, float ref, float is_weight, bool has_is_weight,
                                      const LossParams& p) {
  const float rho = exp_f32(log_ratio);
  PolicyTerms pt = policy_terms(rho, adv, lp, p);
  if (has_is_weight) {
    pt.value *= is_weight;
    pt.d_ratio *= is_weight;
    pt.d_logprob *= is_weight;
  }
  TokenTerms out{pt.value, pt.d_ratio, pt.d_logprob, pt.d_ratio + pt.d_logprob, 0.f, 0};
  if (p.beta != 0.f) {
    KlTerms kt = kl_terms(lp, ref, p.kl_estimator);
    if (p.bias_corrected_kl) {  // d(K rho)/dlp = K' rho + (K rho) d log rho / dlp
      out.d_token += p.beta * rho * kt.value_plus_d;
      kt.d_logprob *= rho;
      kt.value *= rho;
      out.d_ratio += p.beta * kt.value;
    } else {
      out.d_token += p.beta * kt.d_logprob;
    }
    out.loss += p.beta * kt.value;
    out.d_logprob += p.beta * kt.d_logprob;
    out.kl = kt.value;
  }
  out.flags = static_cast<uint8_t>(((rho < p.clip_low && adv < 0.f) ? kClipLow : 0) |
                                   ((rho > p.clip_high && adv > 0.f) ? kClipHigh : 0));
  return out;
}

}  // namespace grpo_kernels
