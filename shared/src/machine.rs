//! A machine as its trainer sees it, and what a plan becomes there: the one place that
//! says where `device=auto` runs and which runtime and CPU threads the trainer's
//! measurements are compared with. The agent feeds it what its worker probe reported;
//! the worker feeds it what libtorch says in its own process; both therefore agree.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::plan::{DeviceChoice, OptimizerImpl, Plan, Runtime};

/// The best instruction set of a CPU among those oneDNN dispatches its kernels on
/// (oneDNN's `cpu_isa` names): kernels, weight reorders, blocking and scratch buffers
/// change with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuIsa {
    Sse41,
    Avx2,
    /// AVX-512 F, BW, VL and DQ.
    Avx512Core,
    /// And AVX-512 BF16.
    Avx512CoreBf16,
    /// And AMX tiles with BF16 and INT8.
    Avx512CoreAmx,
}

impl CpuIsa {
    /// The ISA a CPU with these `/proc/cpuinfo` flags (space-separated) gives oneDNN;
    /// `None` for a CPU with none of them (not x86-64).
    pub fn from_flags(flags: &str) -> Option<CpuIsa> {
        let has: std::collections::BTreeSet<&str> = flags.split_whitespace().collect();
        let all = |names: &[&str]| names.iter().all(|n| has.contains(n));
        let core = all(&["avx512f", "avx512bw", "avx512vl", "avx512dq"]);
        Some(if core && all(&["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]) {
            CpuIsa::Avx512CoreAmx
        } else if core && has.contains("avx512_bf16") {
            CpuIsa::Avx512CoreBf16
        } else if core {
            CpuIsa::Avx512Core
        } else if all(&["avx2", "fma"]) {
            CpuIsa::Avx2
        } else if has.contains("sse4_1") {
            CpuIsa::Sse41
        } else {
            return None;
        })
    }

    /// oneDNN's name for it.
    pub fn word(self) -> &'static str {
        match self {
            CpuIsa::Sse41 => "sse41",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512Core => "avx512_core",
            CpuIsa::Avx512CoreBf16 => "avx512_core_bf16",
            CpuIsa::Avx512CoreAmx => "avx512_core_amx",
        }
    }
}

/// What libtorch can use on one machine, as `headroom worker --probe` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// CUDA devices libtorch can use (not what NVML lists: a driver too old for this
    /// libtorch shows GPUs that jobs cannot run on).
    pub cuda_devices: u32,
    /// libtorch's default CPU thread count (`torch.get_num_threads()`).
    pub cpu_threads: u64,
}

/// Where a job runs, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunsOn {
    Cpu,
    Cuda(u32),
}

impl RunsOn {
    /// `cpu` or `cuda:N`, as devices are named on the wire.
    pub fn id(self) -> String {
        match self {
            RunsOn::Cpu => "cpu".to_owned(),
            RunsOn::Cuda(i) => format!("cuda:{i}"),
        }
    }

    pub fn choice(self) -> DeviceChoice {
        match self {
            RunsOn::Cpu => DeviceChoice::Cpu,
            RunsOn::Cuda(i) => DeviceChoice::Cuda(i),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("cuda:{index} requested but {visible} CUDA devices are visible")]
pub struct NoSuchDevice {
    pub index: u32,
    pub visible: u32,
}

impl Machine {
    /// The device rule: `auto` is the first CUDA device libtorch can use, else the CPU;
    /// `cuda:N` must be one of them.
    pub fn runs_on(&self, choice: DeviceChoice) -> Result<RunsOn, NoSuchDevice> {
        match choice {
            DeviceChoice::Cpu => Ok(RunsOn::Cpu),
            DeviceChoice::Auto if self.cuda_devices > 0 => Ok(RunsOn::Cuda(0)),
            DeviceChoice::Auto => Ok(RunsOn::Cpu),
            DeviceChoice::Cuda(index) if index < self.cuda_devices => Ok(RunsOn::Cuda(index)),
            DeviceChoice::Cuda(index) => Err(NoSuchDevice { index, visible: self.cuda_devices }),
        }
    }

    /// The plan as this machine's trainer runs it, which is what its measurements are
    /// compared with: the trainer's runtime (libtorch's optimizers, reentrant
    /// checkpoints) and this machine's CPU threads where the plan names none.
    pub fn as_run_here(&self, plan: &Plan) -> Plan {
        let mut p = plan.clone();
        p.runtime = Runtime::Headroom;
        // libtorch updates one parameter at a time; there is no foreach or fused path.
        p.optimizer_impl = OptimizerImpl::Auto;
        p.cpu_threads.get_or_insert(self.cpu_threads.max(1));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpus_flags_give_the_isa_onednn_dispatches_on() {
        let zen4 = "fpu sse4_1 avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni";
        assert_eq!(CpuIsa::from_flags(zen4), Some(CpuIsa::Avx512CoreBf16));
        let spr = format!("{zen4} amx_bf16 amx_tile amx_int8");
        assert_eq!(CpuIsa::from_flags(&spr), Some(CpuIsa::Avx512CoreAmx));
        assert_eq!(CpuIsa::from_flags("sse4_1 avx2 fma avx512f avx512bw avx512vl avx512dq"), Some(CpuIsa::Avx512Core));
        // AVX-512 F alone (Knights Landing) is not oneDNN's avx512_core.
        assert_eq!(CpuIsa::from_flags("sse4_1 avx2 fma avx512f"), Some(CpuIsa::Avx2));
        assert_eq!(CpuIsa::from_flags("sse4_1 avx"), Some(CpuIsa::Sse41));
        assert_eq!(CpuIsa::from_flags("fp asimd"), None);
        assert_eq!(CpuIsa::Avx512CoreAmx.word(), "avx512_core_amx");
    }

    #[test]
    fn auto_is_the_first_gpu_libtorch_can_use_else_the_cpu() {
        let gpu = Machine { cuda_devices: 2, cpu_threads: 8 };
        let cpu = Machine { cuda_devices: 0, cpu_threads: 8 };
        assert_eq!(gpu.runs_on(DeviceChoice::Auto), Ok(RunsOn::Cuda(0)));
        assert_eq!(cpu.runs_on(DeviceChoice::Auto), Ok(RunsOn::Cpu));
        assert_eq!(gpu.runs_on(DeviceChoice::Cpu), Ok(RunsOn::Cpu));
        assert_eq!(gpu.runs_on(DeviceChoice::Cuda(1)), Ok(RunsOn::Cuda(1)));
        let missing = gpu.runs_on(DeviceChoice::Cuda(2)).expect_err("only two");
        assert_eq!(missing.to_string(), "cuda:2 requested but 2 CUDA devices are visible");
        assert_eq!(RunsOn::Cuda(1).id(), "cuda:1");
    }

    #[test]
    fn the_trainer_runs_its_own_runtime_with_the_machine_threads_unless_the_plan_names_some() {
        let machine = Machine { cuda_devices: 0, cpu_threads: 6 };
        let mut plan = Plan::example_cnn();
        plan.optimizer_impl = OptimizerImpl::Foreach;
        let here = machine.as_run_here(&plan);
        assert_eq!(
            (here.runtime, here.optimizer_impl, here.cpu_threads),
            (Runtime::Headroom, OptimizerImpl::Auto, Some(6))
        );
        plan.cpu_threads = Some(2);
        assert_eq!(machine.as_run_here(&plan).cpu_threads, Some(2));
    }
}
