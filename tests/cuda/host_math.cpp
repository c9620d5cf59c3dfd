// Host driver of csrc/include/grpo_kernels/row_math.cuh for tests/test_cuda_host_math.py.
//
// Built with g++ (no CUDA): reads one case per line on stdin, writes one result line per case on stdout. Every
// float travels as C99 hex (exact both ways; Python's float.hex / float.fromhex); "nan"/"inf" are accepted.
//
//   LSE V y a b P cut_1 .. cut_{P-1} u_0 .. u_{V-1}
//       -> lse_seq H_seq lse H lp grad_0 .. grad_{V-1}
//          *_seq: one element at a time; the rest: P parts (split at the cuts) pushed 8 at a time (tail one at a
//          time), merged left to right, as a team of threads does; the gradient uses the merged lse and H.
//   POLICY <params> rho adv lp           -> value d_ratio d_logprob
//   KL estimator lp ref                  -> value d_logprob value_plus_d
//   TOKEN <params> lp log_ratio adv ref w has_w coef -> loss kl flags g   (g = coef (d_ratio + d_logprob))
// <params> = policy kl_estimator beta epsilon_low epsilon_high has_delta delta has_dual_clip dual_clip
//            sapo_tau_pos sapo_tau_neg bias_corrected_kl   (the doubles of the Python API; make_loss_params rounds)
#include <cstdio>
#include <iostream>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "grpo_kernels/row_math.cuh"

using namespace grpo_kernels;

namespace {

float read_f(std::istringstream& in) {
  std::string tok;
  in >> tok;
  return std::strtof(tok.c_str(), nullptr);
}

double read_d(std::istringstream& in) {
  std::string tok;
  in >> tok;
  return std::strtod(tok.c_str(), nullptr);
}

long read_i(std::istringstream& in) {
  long v = 0;
  in >> v;
  return v;
}

void put(float x) { std::printf(" %a", static_cast<double>(x)); }

LossParams read_params(std::istringstream& in) {
  const int policy = static_cast<int>(read_i(in));
  const int kl = static_cast<int>(read_i(in));
  const double beta = read_d(in), eps_low = read_d(in), eps_high = read_d(in);
  const bool has_delta = read_i(in) != 0;
  const double delta = read_d(in);
  const bool has_dual = read_i(in) != 0;
  const double dual = read_d(in), tau_pos = read_d(in), tau_neg = read_d(in);
  const bool bias_corrected = read_i(in) != 0;
  return make_loss_params(policy, kl, beta, eps_low, eps_high, has_delta, delta, has_dual, dual, tau_pos, tau_neg,
                          bias_corrected);
}

LseState push_part(const std::vector<float>& u, size_t begin, size_t end) {
  LseState st = lse_empty();
  size_t i = begin;
  for (; i + 8 <= end; i += 8) {
    float chunk[8];
    for (int k = 0; k < 8; ++k) chunk[k] = u[i + k];
    lse_push<8>(st, chunk);
  }
  for (; i < end; ++i) lse_push(st, u[i]);
  return st;
}

void run_lse(std::istringstream& in) {
  const long vocab = read_i(in), target = read_i(in);
  const float a = read_f(in), b = read_f(in);
  const long parts = read_i(in);
  std::vector<size_t> cuts{0};
  for (long p = 1; p < parts; ++p) cuts.push_back(static_cast<size_t>(read_i(in)));
  cuts.push_back(static_cast<size_t>(vocab));
  std::vector<float> u(vocab);
  for (auto& x : u) x = read_f(in);

  LseState seq = lse_empty();
  for (float x : u) lse_push(seq, x);
  LseState merged = lse_empty();
  for (size_t p = 0; p + 1 < cuts.size(); ++p) merged = lse_merge(merged, push_part(u, cuts[p], cuts[p + 1]));

  const float lse = lse_value(merged), entropy = lse_entropy(merged);
  put(lse_value(seq));
  put(lse_entropy(seq));
  put(lse);
  put(entropy);
  put(u[target] - lse);
  for (long v = 0; v < vocab; ++v) put(logit_grad(u[v], v == target, lse, entropy, a, b));
}

void run_policy(std::istringstream& in) {
  const LossParams p = read_params(in);
  const float rho = read_f(in), adv = read_f(in), lp = read_f(in);
  const PolicyTerms t = policy_terms(rho, adv, lp, p);
  put(t.value);
  put(t.d_ratio);
  put(t.d_logprob);
}

void run_kl(std::istringstream& in) {
  const int estimator = static_cast<int>(read_i(in));
  const float lp = read_f(in), ref = read_f(in);
  const KlTerms t = kl_terms(lp, ref, estimator);
  put(t.value);
  put(t.d_logprob);
  put(t.value_plus_d);
}

void run_token(std::istringstream& in) {
  const LossParams p = read_params(in);
  const float lp = read_f(in), log_ratio = read_f(in), adv = read_f(in), ref = read_f(in), w = read_f(in);
  const bool has_w = read_i(in) != 0;
  const float coef = read_f(in);
  const TokenTerms t = token_terms(lp, log_ratio, adv, ref, w, has_w, p);
  put(t.loss);
  put(t.kl);
  std::printf(" %d", static_cast<int>(t.flags));
  put(coef * t.d_token);
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "LSE") {
      run_lse(in);
    } else if (cmd == "POLICY") {
      run_policy(in);
    } else if (cmd == "KL") {
      run_kl(in);
    } else if (cmd == "TOKEN") {
      run_token(in);
    } else {
      std::fprintf(stderr, "unknown command %s\n", cmd.c_str());
      return 2;
    }
    std::printf("\n");
  }
  return 0;
}
