// Autograd and autocast entry points that tch does not expose:
// - backward from several outputs with given gradients at once (gradient checkpointing
//   runs each recomputed segment's backward this way), and
// - autocast on the CPU or CUDA with a chosen half type (fp16 or bf16).
// Compiled by build.rs; called from agent/src/train/model.rs.

#include <cstdio>
#include <exception>
#include <vector>

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>

extern "C" {

// outputs and grads are arrays of n `at::Tensor*` (tch's C tensors). Returns 0, or 1
// with the error's text in err.
int hr_backward(void** outputs, void** grads, int n, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> outs, gs;
    for (int i = 0; i < n; ++i) {
      outs.push_back(*static_cast<at::Tensor*>(outputs[i]));
      gs.push_back(*static_cast<at::Tensor*>(grads[i]));
    }
    torch::autograd::backward(outs, gs, /*retain_graph=*/false, /*create_graph=*/false);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

// dtype: 0 fp16, 1 bf16. Leaving autocast clears its cache of cast weights, as leaving
// `torch.autocast` does.
void hr_autocast(int cuda, int enabled, int dtype) {
  const auto device = cuda ? at::kCUDA : at::kCPU;
  at::autocast::set_autocast_dtype(device, dtype == 1 ? at::kBFloat16 : at::kHalf);
  at::autocast::set_autocast_enabled(device, enabled != 0);
  if (!enabled) at::autocast::clear_cache();
}

// oneDNN and NNPACK on or off for CPU convolutions.
void hr_set_mkldnn(int enabled) {
  at::globalContext().setUserEnabledMkldnn(enabled != 0);
  at::globalContext().setUserEnabledNNPACK(enabled != 0);
}

}  // extern "C"
