// The one place where every credit:: schema is declared. Backends register their kernels in
// csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(credit, CPU, m)) and csrc/cuda/<op>.cu (..., CUDA, m); ops whose GPU
// kernel is Triton get their CUDA implementation from Python (credit_ops/_triton_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing credit_ops._C registers the ops; the module itself is empty (pytorch/extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(credit, m) {
  // ---- value checks (credit_ops/_checks.py within_range on CPU tensors): whether every element of x that `where`
  //      (bool, x's shape) counts lies in [low, high] (None: unbounded) or equals `allow`; NaN fails.
  m.def("values_within(Tensor x, float? low, float? high, float? allow, Tensor? where) -> bool");
  // finite_each on CPU tensors: whether every element of the float tensor x that `where` counts is finite.
  m.def("values_finite(Tensor x, Tensor? where) -> bool");

  // ---- token_logprobs (docs/method.md §3): logits (B, T, V) with stride(2) == 1, labels (B, T) -> logprobs (B, T),
  //      entropy (B, T) or (0,), lse (B, T); the backward returns a contiguous (B, T, V) gradient.
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool return_entropy) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // grad_entropy / entropy may be undefined when the entropy output was not requested or got no gradient.
  m.def(
      "token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor lse, Tensor? entropy, float temperature, int ignore_index) -> Tensor");

  // ---- align_edits (docs/method.md §2)
  // a (P, La), b (P, Lb) int32/int64 (same dtype), lengths (P,) int64; insert_anchor 0 prev, 1 next, 2 none.
  // -> mask_a (P, La) bool, mask_b (P, Lb) bool, region_a (P, La) int32, region_b (P, Lb) int32, distance (P,)
  m.def(
      "align_edits(Tensor a, Tensor a_lengths, Tensor b, Tensor b_lengths, int insert_anchor) "
      "-> (Tensor mask_a, Tensor mask_b, Tensor region_a, Tensor region_b, Tensor distance)");

  // ---- advantages (docs/method.md §1.5-1.6)
  // group_advantages: rewards (N,), group ids (N,) in [0, num_groups); mode 0 grpo, 1 dr_grpo, 2 rloo, 3 batch.
  m.def("group_advantages(Tensor rewards, Tensor group_ids, int num_groups, int mode, float eps) -> Tensor");
  // ibpo_shaping: per sample, its number of correct / valid revisions (N,) int64 -> R' (N,), phi (N,).
  m.def(
      "ibpo_shaping(Tensor rewards, Tensor n_correct, Tensor n_valid, float rho, float lam, float threshold) "
      "-> (Tensor shaped, Tensor phi)");
  // token_advantages: seq_adv (B,), mask (B, T) bool; tokens outside [starts, lengths) get 0 (int64, optional).
  m.def(
      "token_advantages(Tensor seq_adv, Tensor mask, Tensor wrong, Tensor has_repair, Tensor? lengths, "
      "Tensor? starts, bool sign_guard, float unmasked_weight, bool correct_in_loss) "
      "-> (Tensor advantages, Tensor gates)");
  // repair_advantages: +|seq_adv[repair_of]| on the flagged tokens of the selected repair rows (M, T).
  m.def(
      "repair_advantages(Tensor seq_adv, Tensor mask, Tensor repair_of, Tensor selected, Tensor? lengths, "
      "Tensor? starts) -> (Tensor advantages, Tensor gates)");

  // ---- policy_loss and the fused LM head (docs/method.md §4)
  // Token-level policy losses (grpo/dapo/dr_grpo/bnpo), loss and gradient in one pass over the logits.
  // logits (B, T, V) with unit stride in V; labels, advantages, weights (= aggregation weight * mask * gate),
  // old/ref log-probs (B, T); kl_type 0 none, 1 k1, 2 k2, 3 k3; dual_clip 0 = off; old_logprobs None = on-policy.
  // -> loss (), logprobs (B, T), entropy (B, T), grad = d loss / d logits (B, T, V) contiguous ((0,) without
  // write_grad: the no-grad forward reads each row once and writes nothing of size V).
  m.def(
      "policy_loss_fwd(Tensor logits, Tensor labels, Tensor advantages, Tensor weights, Tensor? old_logprobs, "
      "Tensor? ref_logprobs, float temperature, int ignore_index, float eps_low, float eps_high, float dual_clip, "
      "float beta, int kl_type, bool write_grad=True) -> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad)");
  // The same rows written into `grad` (which may be `logits` itself: the in-place-gradient mode and the fused LM
  // head's chunks). coef_given: `weights` are dL/dlogp (a log-prob backward); write_grad false: log-prob forward.
  m.def(
      "policy_loss_rows_(Tensor(a!) grad, Tensor logits, Tensor labels, Tensor? advantages, Tensor weights, "
      "Tensor? old_logprobs, Tensor? ref_logprobs, float temperature, int ignore_index, float eps_low, "
      "float eps_high, float dual_clip, float beta, int kl_type, bool coef_given, bool write_grad) "
      "-> (Tensor loss, Tensor logprobs, Tensor entropy)");
  // The policy losses' per-token bookkeeping on the CPU (the Python wrappers' tensor-op path elsewhere), each one
  // pass over the tokens with its value checks (ValueError naming the argument). policy_loss_inputs: the (B, T)
  // tensors of prepare() -> [labels (ignore_index where not valid), valid, advantages, old, ref, gates, weights,
  // token weights = aggregation weight x gate x weight], leaving out labels, old .. weights when not given, (B, T)
  // or, with pad_last, (B, T + 1) with an ignored last column (flat: flattened to one dimension); agg 0..3 as
  // credit_ops.reference.AGGREGATIONS;
  // float32 (float64) outputs. policy_loss_stats: the 7 statistics of credit_ops.reference.STAT_NAMES (means over
  // the tokens with valid != 0) from any-shaped per-token tensors of logp's size; ratio None: exp(logp - old), or 1
  // without old; kl_type 1..3.
  m.def(
      "policy_loss_inputs(Tensor? labels, Tensor advantages, Tensor? old_logprobs, Tensor? ref_logprobs, "
      "Tensor? mask, Tensor? gates, Tensor? weights, Tensor? logprobs, int B, int T, int vocab, int ignore_index, "
      "int agg, int max_length, bool skip_empty_rows, bool pad_last, bool flat, bool float64) -> Tensor[]");
  m.def(
      "policy_loss_stats(Tensor logp, Tensor? entropy, Tensor valid, Tensor advantages, Tensor? ratio, "
      "Tensor? old_logprobs, Tensor? ref_logprobs, float eps_low, float eps_high, int kl_type) -> Tensor[]");
  // A token-level policy loss on CPU tensors in one call: policy_loss_inputs, policy_loss_fwd's rows and
  // policy_loss_stats, differentiable w.r.t. logits (autograd in C++: no Python autograd on the call). logits (B, T,
  // V) or (B, T + 1, V); kl_type 1..3 names the KL estimator (the loss uses it only when beta != 0; the statistics
  // always); active_only: the rows whose coefficient is 0 are skipped and the statistics cover the others.
  // -> [loss, clip_frac_low, clip_frac_high, clip_frac, ratio_mean, kl_mean, entropy_mean, num_tokens, grad (d loss /
  // d logits, contiguous; (0,) without write_grad)]
  m.def(
      "policy_loss_cpu(Tensor logits, Tensor labels, Tensor advantages, Tensor? old_logprobs, Tensor? ref_logprobs, "
      "Tensor? mask, Tensor? gates, Tensor? weights, float temperature, int ignore_index, float eps_low, "
      "float eps_high, float dual_clip, float beta, int kl_type, int agg, int max_length, bool skip_empty_rows, "
      "bool active_only, bool write_grad) -> Tensor[]");
  // The fused LM head's token-level loss on CPU tensors in one call (inputs, the chunk loop of fused_linear_policy_loss_fwd,
  // statistics; autograd in C++): hidden (N, H), weight (V, H), labels and the per-token tensors (B, T), N = B T;
  // chunk_rows tokens per logits chunk. -> [loss, the 7 statistics, grad_hidden, grad_weight, grad_bias] (the
  // gradients (0,) without compute_grad, grad_bias (0,) without bias).
  m.def(
      "fused_linear_policy_loss_cpu(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor advantages, "
      "Tensor? old_logprobs, Tensor? ref_logprobs, Tensor? mask, Tensor? gates, Tensor? weights, float temperature, "
      "int ignore_index, float eps_low, float eps_high, float dual_clip, float beta, int kl_type, int agg, "
      "int max_length, bool skip_empty_rows, bool active_only, int chunk_rows, bool compute_grad) -> Tensor[]");
  // Whether policy_loss_rows_ can take these logits on their device with its GPU kernel (the Hopper cluster
  // kernel, csrc/cuda/policy_loss.cu); false on CPU, where policy_loss_rows_ always runs.
  m.def("policy_loss_cluster_ok(Tensor logits) -> bool");
  // Fused LM head: hidden (N, H), weight (V, H), bias (V,) or None, labels and per-token tensors (N,); logits are
  // computed chunk_size tokens at a time (0: ~1 GiB of logits per chunk), never all at once. The loss op returns
  // the gradients computed in its forward ((0,) without compute_grad, grad_bias (0,) without bias).
  m.def(
      "fused_linear_policy_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor advantages, "
      "Tensor weights, Tensor? old_logprobs, Tensor? ref_logprobs, float temperature, int ignore_index, "
      "float eps_low, float eps_high, float dual_clip, float beta, int kl_type, int chunk_size, bool compute_grad) "
      "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "fused_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, "
      "int ignore_index, int chunk_size) -> (Tensor logprobs, Tensor entropy)");
  m.def(
      "fused_linear_logprobs_bwd(Tensor grad_logprobs, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "float temperature, int ignore_index, int chunk_size) -> (Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
}
