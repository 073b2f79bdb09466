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
  // ---- token_logprobs: logits (N, V), labels (N,) -> logprobs (N,), entropy (N,) or (0,), lse (N,)
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool return_entropy) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // grad_entropy / entropy may be undefined when the entropy output was not requested or got no gradient.
  m.def(
      "token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor lse, Tensor? entropy, float temperature, int ignore_index) -> Tensor");

  // ---- align_edits (issue 4) schemas go here.

  // ---- credit (issue 5) schemas go here.

  // ---- policy_loss (issue 3) schemas go here.
}
