// Autograd and autocast entry points that tch does not expose:
// - autocast on the CPU or CUDA with a chosen half type (fp16 or bf16),
// - oneDNN and NNPACK on or off for CPU convolutions,
// - reentrant gradient checkpointing, like torch.utils.checkpoint(use_reentrant=True):
//   an autograd Function whose forward runs a region without autograd and whose backward
//   recomputes it and runs a backward of its own (differences: see Checkpoint). The
//   region runs in Rust, through a callback.
// Compiled by build.rs; declared, with their safety contracts, in agent/src/train/ffi.rs.
// No C++ exception crosses into Rust: every entry point catches and reports.

#include <cstdio>
#include <exception>
#include <stdexcept>
#include <vector>

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

void report(const std::exception& e, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", e.what());
}

// Runs a region in Rust. Inputs are handed over as new at::Tensor* that Rust owns; Rust
// hands back outputs as at::Tensor* that the caller owns. Returns 0, or non-zero with
// the error's text in err.
typedef int (*hr_region_fn)(void* user, int region, void** inputs, int n_in, int grad, void** outputs,
                            int max_out, int* n_out, char* err, size_t err_len);

constexpr int kMaxOutputs = 256;

std::vector<at::Tensor> run_region(int64_t fn, int64_t user, int64_t region, const std::vector<at::Tensor>& inputs,
                                   bool grad) {
  auto f = reinterpret_cast<hr_region_fn>(fn);
  std::vector<void*> ins;
  ins.reserve(inputs.size());
  for (const auto& t : inputs) ins.push_back(new at::Tensor(t));
  std::vector<void*> outs(kMaxOutputs, nullptr);
  int n = 0;
  char err[1024] = {0};
  int rc = f(reinterpret_cast<void*>(user), static_cast<int>(region), ins.data(), static_cast<int>(ins.size()),
             grad ? 1 : 0, outs.data(), kMaxOutputs, &n, err, sizeof err);
  std::vector<at::Tensor> result;
  for (int i = 0; i < n && i < kMaxOutputs; ++i) {
    auto* p = static_cast<at::Tensor*>(outs[i]);
    result.push_back(*p);
    delete p;
  }
  if (rc != 0) throw std::runtime_error(err[0] ? err : "checkpointed region failed");
  return result;
}

// Autocast on or off for a device with a dtype until the scope ends, then as before.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType device, bool enabled, at::ScalarType dtype)
      : device_(device),
        was_enabled_(at::autocast::is_autocast_enabled(device)),
        was_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_dtype(device, dtype);
    at::autocast::set_autocast_enabled(device, enabled);
  }
  ~AutocastScope() {
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
    if (!was_enabled_) at::autocast::clear_cache();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_;
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

// A reentrant checkpoint: forward runs the region without autograd and keeps its inputs;
// backward runs it again with autograd and then a backward of its own from the outputs'
// gradients. One deliberate difference from torch.utils.checkpoint(use_reentrant=True):
// the last input is a zero-size tensor that requires grad, so a region whose inputs need
// no gradient (the first, reading the batch) still gives its parameters theirs.
// `differentiable` has one flag per output; outputs without it are marked so.
struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                int64_t fn, int64_t user, int64_t region, int64_t cuda,
                                                std::vector<int64_t> differentiable) {
    // Outputs that got no gradient arrive undefined, not as zeros (as the estimator
    // models it: no full-size zero tensors, no backward through them).
    ctx->set_materialize_grads(false);
    ctx->saved_data["fn"] = fn;
    ctx->saved_data["user"] = user;
    ctx->saved_data["region"] = region;
    const auto device = cuda ? at::kCUDA : at::kCPU;
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(device);
    ctx->saved_data["cuda"] = cuda;
    ctx->saved_data["bf16"] = at::autocast::get_autocast_dtype(device) == at::kBFloat16;
    ctx->save_for_backward(inputs.vec());
    std::vector<at::Tensor> real(inputs.begin(), inputs.end() - 1);
    std::vector<at::Tensor> outs;
    {
      at::NoGradGuard no_grad;
      outs = run_region(fn, user, region, real, false);
    }
    std::vector<at::Tensor> fixed;
    for (size_t i = 0; i < outs.size(); ++i) {
      const bool diff = i < differentiable.size() && differentiable[i] != 0;
      if (!diff || !outs[i].is_floating_point()) fixed.push_back(outs[i]);
    }
    if (!fixed.empty()) ctx->mark_non_differentiable(fixed);
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    std::vector<at::Tensor> detached;
    detached.reserve(saved.size());
    for (const auto& t : saved) {
      auto d = t.detach();
      if (t.is_floating_point()) d.requires_grad_(t.requires_grad());
      detached.push_back(d);
    }
    const bool cuda = ctx->saved_data["cuda"].toInt() != 0;
    const auto device = cuda ? at::kCUDA : at::kCPU;
    const bool autocast = ctx->saved_data["autocast"].toBool();
    const auto dtype = ctx->saved_data["bf16"].toBool() ? at::kBFloat16 : at::kHalf;
    std::vector<at::Tensor> outs;
    {
      at::AutoGradMode enable(true);
      AutocastScope scope(device, autocast, dtype);
      std::vector<at::Tensor> real(detached.begin(), detached.end() - 1);
      outs = run_region(ctx->saved_data["fn"].toInt(), ctx->saved_data["user"].toInt(),
                        ctx->saved_data["region"].toInt(), real, true);
    }
    std::vector<at::Tensor> roots, root_grads;
    for (size_t i = 0; i < outs.size() && i < grads.size(); ++i) {
      if (outs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    outs.clear();
    if (!roots.empty()) torch::autograd::backward(roots, root_grads, /*retain_graph=*/false, /*create_graph=*/false);
    torch::autograd::variable_list result;
    for (const auto& d : detached) result.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    // fn, user, region, cuda, differentiable
    for (int i = 0; i < 5; ++i) result.push_back(at::Tensor());
    return result;
  }
};

}  // namespace

extern "C" {

// dtype: 0 fp16, 1 bf16. Leaving autocast clears its cache of cast weights, as leaving
// `torch.autocast` does.
void hr_autocast(int cuda, int enabled, int dtype) {
  try {
    const auto device = cuda ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_dtype(device, dtype == 1 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(device, enabled != 0);
    if (!enabled) at::autocast::clear_cache();
  } catch (const std::exception&) {
    // Setting thread-local flags does not throw in practice; nothing to report.
  }
}

// oneDNN and NNPACK on or off for CPU convolutions.
void hr_set_mkldnn(int enabled) {
  try {
    at::globalContext().setUserEnabledMkldnn(enabled != 0);
    at::globalContext().setUserEnabledNNPACK(enabled != 0);
  } catch (const std::exception&) {
  }
}

// Runs region `region` through `fn` as a reentrant checkpoint over the n_in inputs, on
// CUDA device `cuda_index` (-1: the CPU); `differentiable` holds one flag per output;
// writes up to max_out outputs (new at::Tensor*, owned by the caller) and their count.
int hr_checkpoint(hr_region_fn fn, void* user, int region, int cuda_index, void** inputs, int n_in,
                  const unsigned char* differentiable, int n_diff, void** outputs, int max_out, int* n_out, char* err,
                  size_t err_len) {
  try {
    torch::autograd::variable_list ins;
    for (int i = 0; i < n_in; ++i) ins.push_back(*static_cast<at::Tensor*>(inputs[i]));
    // The zero-size input that puts the node on the graph (see Checkpoint); on the job's
    // own device. It allocates nothing.
    const auto device = cuda_index >= 0 ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_index))
                                        : at::Device(at::kCPU);
    ins.push_back(at::empty({0}, at::TensorOptions().device(device)).requires_grad_(true));
    std::vector<int64_t> diff;
    for (int i = 0; i < n_diff; ++i) diff.push_back(differentiable[i] ? 1 : 0);
    // A TensorList (not a vector) is what autograd recognises as a list of inputs.
    auto outs = Checkpoint::apply(at::TensorList(ins), reinterpret_cast<int64_t>(fn), reinterpret_cast<int64_t>(user),
                                  static_cast<int64_t>(region), static_cast<int64_t>(cuda_index >= 0 ? 1 : 0), diff);
    if (static_cast<int>(outs.size()) > max_out) throw std::runtime_error("a checkpointed region has too many outputs");
    for (size_t i = 0; i < outs.size(); ++i) outputs[i] = new at::Tensor(outs[i]);
    *n_out = static_cast<int>(outs.size());
    return 0;
  } catch (const std::exception& e) {
    report(e, err, err_len);
    return 1;
  }
}

}  // extern "C"
