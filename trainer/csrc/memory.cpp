// Memory instrumentation that libtorch does not expose through tch:
// - an exact counting CPU allocator (current and peak bytes, optional budget), and
// - the CUDA caching allocator's statistics (allocated/reserved and their peaks).
// Compiled by build.rs; called from agent/src/train/memory.rs.

#include <atomic>
#include <cstdint>
#include <new>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#ifdef HEADROOM_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace {

// Each block carries its size in a header, so the deleter needs no lookup table and the
// data pointer can equal the context pointer (which raw_allocate, used by oneDNN's
// scratchpads, requires). 64 bytes keeps libtorch's default 64-byte alignment.
constexpr size_t kHeader = 64;

std::atomic<uint64_t> g_current{0};
std::atomic<uint64_t> g_peak{0};
std::atomic<uint64_t> g_budget{0};  // 0: no budget
std::atomic<uint64_t> g_allocations{0};

void raise_peak(uint64_t now) {
  uint64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void counting_delete(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  uint64_t n = *reinterpret_cast<uint64_t*>(base);
  g_current.fetch_sub(n, std::memory_order_relaxed);
  c10::free_cpu(base);
}

struct CountingCpuAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    uint64_t before = g_current.fetch_add(n, std::memory_order_relaxed);
    uint64_t now = before + n;
    uint64_t budget = g_budget.load(std::memory_order_relaxed);
    if (budget != 0 && now > budget) {
      g_current.fetch_sub(n, std::memory_order_relaxed);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory: tried to allocate ", n,
                       " bytes with ", before, " bytes in use and a limit of ", budget, " bytes");
    }
    void* base = nullptr;
    try {
      base = c10::alloc_cpu(n + kHeader);
    } catch (...) {
      g_current.fetch_sub(n, std::memory_order_relaxed);
      throw;
    }
    raise_peak(now);
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    *reinterpret_cast<uint64_t*>(base) = n;
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &counting_delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &counting_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingCpuAllocator g_allocator;

}  // namespace

extern "C" {

// Must run before the first CPU tensor that should be counted. Tensors made earlier keep
// their own deleters and are simply not counted.
void hr_cpu_counter_install() { c10::SetCPUAllocator(&g_allocator, /*priority=*/100); }

void hr_cpu_counter_set_budget(uint64_t bytes) { g_budget.store(bytes); }

// out: current, peak, allocation count.
void hr_cpu_counter_read(uint64_t* out) {
  out[0] = g_current.load();
  out[1] = g_peak.load();
  out[2] = g_allocations.load();
}

void hr_cpu_counter_reset_peak() { g_peak.store(g_current.load()); }

// out: allocated, allocated peak, reserved, reserved peak.
// Returns 0 on success, -1 if unsupported or libtorch raised.
int hr_cuda_stats(int device, int64_t* out) {
#ifdef HEADROOM_CUDA
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[agg].current;
    out[1] = stats.allocated_bytes[agg].peak;
    out[2] = stats.reserved_bytes[agg].current;
    out[3] = stats.reserved_bytes[agg].peak;
    return 0;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  (void)out;
  return -1;
#endif
}

int hr_cuda_reset_peak(int device) {
#ifdef HEADROOM_CUDA
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

int hr_cuda_set_memory_fraction(int device, double fraction) {
#ifdef HEADROOM_CUDA
  try {
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  (void)fraction;
  return -1;
#endif
}

// Returns the caching allocator's unused cached blocks to the driver (`empty_cache()`).
int hr_cuda_empty_cache() {
#ifdef HEADROOM_CUDA
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
#else
  return -1;
#endif
}

}  // extern "C"
