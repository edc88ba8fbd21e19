// libtorch's own optimizers (torch::optim::SGD, Adam, AdamW), held by Headroom so that
// their state can be saved into a checkpoint and loaded back on resume, which tch's
// optimizer wrapper cannot do. The arithmetic, and so the memory of every step, is
// libtorch's.
// Compiled by build.rs; declared, with their safety contracts, in agent/src/train/ffi.rs.
// No C++ exception crosses into Rust: every entry point catches and reports.

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/serialize.h>

namespace {

void report(const std::exception& e, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", e.what());
}

torch::optim::Optimizer* as_optimizer(void* opt) { return static_cast<torch::optim::Optimizer*>(opt); }

// Runs `f`: 0, or -1 with the exception's text in err (no exception reaches Rust).
template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    report(e, err, err_len);
    return -1;
  }
}

}  // namespace

extern "C" {

// kind: 0 SGD (a = momentum, nesterov), 1 Adam, 2 AdamW (a, b = betas). `params` points
// to n live at::Tensor*, in one parameter group. Returns the optimizer as a
// torch::optim::Optimizer* (the base the other entry points cast back to), or null with
// the reason in err.
void* hr_optim_new(int kind, double lr, double a, double b, double eps, double weight_decay, int nesterov,
                   void** params, int n, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> ps;
    ps.reserve(n > 0 ? n : 0);
    for (int i = 0; i < n; ++i) ps.push_back(*static_cast<at::Tensor*>(params[i]));
    switch (kind) {
      case 0:
        return static_cast<torch::optim::Optimizer*>(new torch::optim::SGD(
            ps, torch::optim::SGDOptions(lr).momentum(a).weight_decay(weight_decay).nesterov(nesterov != 0)));
      case 1:
        return static_cast<torch::optim::Optimizer*>(new torch::optim::Adam(
            ps, torch::optim::AdamOptions(lr).betas({a, b}).eps(eps).weight_decay(weight_decay)));
      case 2:
        return static_cast<torch::optim::Optimizer*>(new torch::optim::AdamW(
            ps, torch::optim::AdamWOptions(lr).betas({a, b}).eps(eps).weight_decay(weight_decay)));
      default:
        throw std::invalid_argument("unknown optimizer kind " + std::to_string(kind));
    }
  } catch (const std::exception& e) {
    report(e, err, err_len);
  }
  return nullptr;
}

void hr_optim_free(void* opt) { delete as_optimizer(opt); }

// optimizer.step(); 0 or -1 with the reason in err.
int hr_optim_step(void* opt, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { as_optimizer(opt)->step(); });
}

// optimizer.zero_grad(set_to_none=True).
int hr_optim_zero_grad(void* opt, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { as_optimizer(opt)->zero_grad(true); });
}

// Sets the learning rate of every parameter group.
int hr_optim_set_lr(void* opt, double lr, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    for (auto& group : as_optimizer(opt)->param_groups()) group.options().set_lr(lr);
  });
}

// Writes the optimizer's state (moments, step counts, options) to `path`.
int hr_optim_save(void* opt, const char* path, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { torch::save(*as_optimizer(opt), std::string(path)); });
}

// Reads a state written by hr_optim_save into an optimizer of the same kind over the
// same parameters, onto their device.
int hr_optim_load(void* opt, const char* path, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* o = as_optimizer(opt);
    c10::optional<c10::Device> device;
    for (const auto& group : o->param_groups())
      for (const auto& p : group.params())
        if (!device) device = p.device();
    torch::serialize::InputArchive archive;
    archive.load_from(std::string(path), device);
    o->load(archive);
  });
}

}  // extern "C"
