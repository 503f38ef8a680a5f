// Every schema of the udafast operator library. Kernels register per backend in
// csrc/cpu/<hot_path>.cpp and csrc/cuda/<hot_path>.cu; fake (meta) kernels and autograd are
// registered from Python (udafast/ops/registrations.py).
#include <Python.h>
#include <torch/library.h>

// An importable module, so that `import udafast._C` loads the library and its registrations.
static struct PyModuleDef udafast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&udafast_module); }

TORCH_LIBRARY(udafast, m) {
  // 1.1 class-balanced thresholds (class_thresholds.cpp)
  m.def("class_thresholds(Tensor conf, Tensor pred, int num_classes, float portion, int ignore_index) -> Tensor");
  m.def("class_histogram_add_(Tensor(a!) counts, Tensor conf, Tensor pred, int ignore_index) -> ()");
  m.def("cbst_pseudo_labels(Tensor probs, Tensor thresholds, int ignore_index) -> Tensor");
  // 1.2 per-class top-K (topk_per_class.cpp)
  m.def("topk_per_class(Tensor scores, Tensor labels, int num_classes, int k, int ignore_index) -> (Tensor, Tensor)");
  // 1.3 prototypes (prototype_softmax.cpp, class_feature_sums.cpp)
  // Returns (softmax or log-softmax [B, C, H, W], distances [B, C, H, W]); the backward reuses the
  // distances instead of recomputing C x D work per pixel.
  m.def("prototype_softmax(Tensor features, Tensor prototypes, float tau, bool log) -> (Tensor, Tensor)");
  m.def("prototype_softmax_backward(Tensor grad_out, Tensor out, Tensor distances, Tensor features, Tensor prototypes, float tau, bool log) -> Tensor");
  m.def("prototype_rectify(Tensor features, Tensor prototypes, Tensor soft_labels, float tau) -> Tensor");
  m.def("class_feature_sums(Tensor features, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");
  // 1.4 fused losses (sce_loss.cpp, kl_loss.cpp). The forward also returns the per-pixel
  // log-sum-exp [B, H, W] and the valid-pixel count (int64, 0-d) so that the backward is one pass.
  m.def("sce_loss(Tensor logits, Tensor target, float alpha, float beta, float reg_weight, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("sce_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, Tensor num_valid, float alpha, float beta, float reg_weight, int ignore_index) -> Tensor");
  m.def("kl_loss(Tensor logits, Tensor target_probs, Tensor? valid_mask) -> (Tensor, Tensor, Tensor)");
  m.def("kl_loss_backward(Tensor grad_loss, Tensor logits, Tensor target_probs, Tensor? valid_mask, Tensor lse, Tensor num_valid) -> Tensor");
}
