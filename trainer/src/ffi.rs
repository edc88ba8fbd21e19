//! Every call into the C++ shims (`csrc/memory.cpp`, `csrc/autograd.cpp`,
//! `csrc/optim.cpp`), each with the
//! contract that makes it safe, and safe wrappers the trainer uses. Nothing else in the
//! agent declares a foreign function.

use std::ffi::c_void;

use tch::Tensor;

unsafe extern "C" {
    // --- csrc/memory.cpp -------------------------------------------------------------
    // No arguments or plain values; the shim keeps its own static allocator.
    fn hr_cpu_counter_install();
    fn hr_cpu_counter_set_budget(bytes: u64);
    // Writes exactly 3 values to `out`.
    fn hr_cpu_counter_read(out: *mut u64);
    fn hr_cpu_counter_reset_peak();
    // Writes exactly 4 values to `out`, or none and returns -1.
    fn hr_cuda_stats(device: i32, out: *mut i64) -> i32;
    fn hr_cuda_reset_peak(device: i32) -> i32;
    fn hr_cuda_set_memory_fraction(device: i32, fraction: f64) -> i32;
    fn hr_cuda_empty_cache() -> i32;

    // --- csrc/autograd.cpp -----------------------------------------------------------
    fn hr_autocast(cuda: i32, enabled: i32, dtype: i32);
    fn hr_set_mkldnn(enabled: i32);
    // `inputs` points to `n_in` live `at::Tensor*`; `differentiable` to `n_diff` flags;
    // `outputs` to `max_out` writable slots that receive new `at::Tensor*` the caller
    // owns; `fn_` is called back, on this thread or the autograd engine's, with `user`,
    // for as long as the graph lives.
    fn hr_checkpoint(
        fn_: RegionFn,
        user: *mut c_void,
        region: i32,
        cuda_index: i32,
        inputs: *mut *mut c_void,
        n_in: i32,
        differentiable: *const u8,
        n_diff: i32,
        outputs: *mut *mut c_void,
        max_out: i32,
        n_out: *mut i32,
        err: *mut u8,
        err_len: usize,
    ) -> i32;

    // --- csrc/optim.cpp --------------------------------------------------------------
    // `params` points to `n` live `at::Tensor*` (copied: the optimizer shares their
    // storage, not the pointers); `err` has `err_len` writable bytes. Returns an owned
    // optimizer or null.
    fn hr_optim_new(
        kind: i32,
        lr: f64,
        a: f64,
        b: f64,
        eps: f64,
        weight_decay: f64,
        nesterov: i32,
        params: *mut *mut c_void,
        n: i32,
        err: *mut u8,
        err_len: usize,
    ) -> *mut c_void;
    // `opt` from hr_optim_new, freed exactly once.
    fn hr_optim_free(opt: *mut c_void);
    // `opt` live; `err` has `err_len` writable bytes; `path` NUL-terminated.
    fn hr_optim_step(opt: *mut c_void, err: *mut u8, err_len: usize) -> i32;
    fn hr_optim_zero_grad(opt: *mut c_void, err: *mut u8, err_len: usize) -> i32;
    fn hr_optim_set_lr(opt: *mut c_void, lr: f64, err: *mut u8, err_len: usize) -> i32;
    fn hr_optim_save(opt: *mut c_void, path: *const std::ffi::c_char, err: *mut u8, err_len: usize) -> i32;
    fn hr_optim_load(opt: *mut c_void, path: *const std::ffi::c_char, err: *mut u8, err_len: usize) -> i32;
}

/// Which of libtorch's optimizers, with its options.
#[derive(Clone, Copy, Debug)]
pub enum OptimKind {
    Sgd { momentum: f64, nesterov: bool },
    Adam { beta1: f64, beta2: f64, eps: f64 },
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

/// One of libtorch's optimizers over a fixed list of parameters, whose state can be
/// saved and loaded (`torch::save(optimizer)`); owned, freed on drop.
pub struct Optim {
    raw: *mut c_void,
}

// SAFETY: the optimizer is only used through `&mut self` or `&self` from one thread at
// a time; libtorch's optimizers hold no thread-affine state.
unsafe impl Send for Optim {}

fn call(f: impl FnOnce(*mut u8, usize) -> i32) -> Result<(), String> {
    let mut err = vec![0u8; 2048];
    let rc = f(err.as_mut_ptr(), err.len());
    if rc == 0 { Ok(()) } else { Err(message(&err)) }
}

fn c_path(path: &std::path::Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL byte in the path", path.display()))
}

impl Optim {
    pub fn new(kind: OptimKind, lr: f64, weight_decay: f64, params: &[&Tensor]) -> Result<Optim, String> {
        let (k, a, b, eps, nesterov) = match kind {
            OptimKind::Sgd { momentum, nesterov } => (0, momentum, 0.0, 0.0, i32::from(nesterov)),
            OptimKind::Adam { beta1, beta2, eps } => (1, beta1, beta2, eps, 0),
            OptimKind::AdamW { beta1, beta2, eps } => (2, beta1, beta2, eps, 0),
        };
        let mut ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let n = i32::try_from(ptrs.len()).map_err(|_| "optimizer: too many parameters".to_owned())?;
        let mut err = vec![0u8; 2048];
        // SAFETY: `ptrs` holds `n` pointers to tensors that live through the call; `err`
        // is writable for its length.
        let raw = unsafe {
            hr_optim_new(k, lr, a, b, eps, weight_decay, nesterov, ptrs.as_mut_ptr(), n, err.as_mut_ptr(), err.len())
        };
        if raw.is_null() { Err(message(&err)) } else { Ok(Optim { raw }) }
    }

    pub fn step(&mut self) -> Result<(), String> {
        // SAFETY: `raw` is live; the closure's buffer is writable for its length.
        call(|e, n| unsafe { hr_optim_step(self.raw, e, n) })
    }

    pub fn zero_grad(&mut self) -> Result<(), String> {
        // SAFETY: as in `step`.
        call(|e, n| unsafe { hr_optim_zero_grad(self.raw, e, n) })
    }

    pub fn set_learning_rate(&mut self, lr: f64) -> Result<(), String> {
        // SAFETY: as in `step`.
        call(|e, n| unsafe { hr_optim_set_lr(self.raw, lr, e, n) })
    }

    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let p = c_path(path)?;
        // SAFETY: as in `step`; `p` is NUL-terminated and lives through the call.
        call(|e, n| unsafe { hr_optim_save(self.raw, p.as_ptr(), e, n) })
    }

    pub fn load(&mut self, path: &std::path::Path) -> Result<(), String> {
        let p = c_path(path)?;
        // SAFETY: as in `save`.
        call(|e, n| unsafe { hr_optim_load(self.raw, p.as_ptr(), e, n) })
    }
}

impl Drop for Optim {
    fn drop(&mut self) {
        // SAFETY: `raw` came from hr_optim_new and is freed only here.
        unsafe { hr_optim_free(self.raw) }
    }
}

/// The callback a checkpoint runs a region with: takes ownership of `n_in` new
/// `at::Tensor*` inputs, writes up to `max_out` outputs it hands over, returns 0 or an
/// error code with a message in `err`.
pub type RegionFn = unsafe extern "C" fn(
    user: *mut c_void,
    region: i32,
    inputs: *mut *mut c_void,
    n_in: i32,
    grad: i32,
    outputs: *mut *mut c_void,
    max_out: i32,
    n_out: *mut i32,
    err: *mut u8,
    err_len: usize,
) -> i32;

fn message(err: &[u8]) -> String {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    String::from_utf8_lossy(&err[..end]).into_owned()
}

pub fn cpu_counter_install(budget: Option<u64>) {
    // SAFETY: plain values.
    unsafe {
        hr_cpu_counter_install();
        hr_cpu_counter_set_budget(budget.unwrap_or(0));
    }
}

/// `(current, peak, budget)` of the counting CPU allocator.
pub fn cpu_counter_read() -> [u64; 3] {
    let mut out = [0u64; 3];
    // SAFETY: the shim writes exactly three values into a buffer of three.
    unsafe { hr_cpu_counter_read(out.as_mut_ptr()) };
    out
}

pub fn cpu_counter_reset_peak() {
    // SAFETY: no arguments.
    unsafe { hr_cpu_counter_reset_peak() }
}

/// `(allocated, peak, reserved, reserved peak)` of CUDA device `device`, if it reports.
pub fn cuda_stats(device: i32) -> Option<[i64; 4]> {
    let mut out = [0i64; 4];
    // SAFETY: the shim writes exactly four values into a buffer of four, or none.
    let rc = unsafe { hr_cuda_stats(device, out.as_mut_ptr()) };
    (rc == 0).then_some(out)
}

pub fn cuda_reset_peak(device: i32) {
    // SAFETY: plain value; a failure leaves the old window.
    unsafe {
        hr_cuda_reset_peak(device);
    }
}

pub fn cuda_set_memory_fraction(device: i32, fraction: f64) -> bool {
    // SAFETY: plain values.
    unsafe { hr_cuda_set_memory_fraction(device, fraction) == 0 }
}

/// `torch.cuda.empty_cache()`; false without CUDA or when libtorch raised.
pub fn cuda_empty_cache() -> bool {
    // SAFETY: no arguments; the shim catches libtorch's exceptions.
    unsafe { hr_cuda_empty_cache() == 0 }
}

/// Autocast on or off for a device, with fp16 or bf16.
pub fn autocast(cuda: bool, enabled: bool, bf16: bool) {
    // SAFETY: plain values; thread-local state in libtorch.
    unsafe { hr_autocast(i32::from(cuda), i32::from(enabled), i32::from(bf16)) }
}

/// oneDNN (and NNPACK) for CPU convolutions on or off, before any convolution runs.
pub fn set_onednn(enabled: bool) {
    // SAFETY: sets a flag in libtorch's global context.
    unsafe { hr_set_mkldnn(i32::from(enabled)) }
}

/// Runs `region` of `user`'s callback as a reentrant checkpoint over `inputs`, on CUDA
/// device `cuda` (`None`: the CPU); `differentiable` says which outputs carry gradients.
///
/// # Safety
/// `user` must stay valid, and `f` callable with it from another thread, for as long as
/// the autograd graph of the returned outputs lives (until its backward has run or every
/// tensor of it is dropped).
pub unsafe fn checkpoint(
    f: RegionFn,
    user: *mut c_void,
    region: usize,
    cuda: Option<usize>,
    inputs: &[Tensor],
    differentiable: &[bool],
) -> Result<Vec<Tensor>, String> {
    const MAX_OUT: usize = 256;
    let mut ins: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut outs: Vec<*mut c_void> = vec![std::ptr::null_mut(); MAX_OUT];
    let mut n_out = 0i32;
    let mut err = vec![0u8; 4096];
    let region = i32::try_from(region).map_err(|_| "checkpoint: region index".to_owned())?;
    let n_in = i32::try_from(ins.len()).map_err(|_| "checkpoint: too many inputs".to_owned())?;
    let flags: Vec<u8> = differentiable.iter().map(|&d| u8::from(d)).collect();
    let n_diff = i32::try_from(flags.len()).map_err(|_| "checkpoint: too many outputs".to_owned())?;
    let cuda_index = match cuda {
        Some(i) => i32::try_from(i).map_err(|_| "checkpoint: device index".to_owned())?,
        None => -1,
    };
    // SAFETY: `ins` holds `n_in` pointers to live tensors; `flags` has `n_diff` entries;
    // `outs` has MAX_OUT writable slots; `err` is writable; the caller guarantees `user`
    // for the graph's lifetime.
    let rc = unsafe {
        hr_checkpoint(
            f,
            user,
            region,
            cuda_index,
            ins.as_mut_ptr(),
            n_in,
            flags.as_ptr(),
            n_diff,
            outs.as_mut_ptr(),
            MAX_OUT as i32,
            &mut n_out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        return Err(message(&err));
    }
    let n = usize::try_from(n_out).unwrap_or(0).min(MAX_OUT);
    // SAFETY: the shim wrote `n` new tensor pointers whose ownership passes to us.
    Ok(outs[..n].iter().map(|&p| unsafe { Tensor::from_ptr(p.cast()) }).collect())
}

/// Takes ownership of `n` tensors the shim handed over.
///
/// # Safety
/// `ptrs` must point to `n` new `at::Tensor*` that nothing else owns.
pub unsafe fn take_tensors(ptrs: *mut *mut c_void, n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| {
            // SAFETY: the caller's contract: `n` valid, owned pointers.
            unsafe { Tensor::from_ptr((*ptrs.add(i)).cast()) }
        })
        .collect()
}

/// Hands tensors over to the shim through `out` (at most `max`); returns how many.
///
/// # Safety
/// `out` must have `max` writable slots.
pub unsafe fn give_tensors(tensors: Vec<Tensor>, out: *mut *mut c_void, max: usize) -> usize {
    let mut n = 0;
    for mut t in tensors.into_iter().take(max) {
        let p = t.as_mut_ptr();
        std::mem::forget(t);
        // SAFETY: the caller's contract: `max` writable slots; ownership of `p` moves.
        unsafe { *out.add(n) = p as *mut c_void };
        n += 1;
    }
    n
}

/// Writes `text` into a C buffer of `len` bytes, NUL-terminated.
///
/// # Safety
/// `buf` must have `len` writable bytes.
pub unsafe fn write_error(buf: *mut u8, len: usize, text: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let bytes = text.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: the caller's contract: `len` writable bytes; n < len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, n);
        *buf.add(n) = 0;
    }
}
