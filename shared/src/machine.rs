//! A machine as its trainer sees it, and what a plan becomes there: the one place that
//! says where `device=auto` runs and which runtime and CPU threads the trainer's
//! measurements are compared with. The agent feeds it what its worker probe reported;
//! the worker feeds it what libtorch says in its own process; both therefore agree.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::isa::CpuIsa;
use crate::plan::{DeviceChoice, OptimizerImpl, Plan, Runtime};

/// What libtorch can use on one machine, as `headroom worker --probe` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// CUDA devices libtorch can use (not what NVML lists: a driver too old for this
    /// libtorch shows GPUs that jobs cannot run on).
    pub cuda_devices: u32,
    /// libtorch's default CPU thread count (`torch.get_num_threads()`).
    pub cpu_threads: u64,
    /// The CPU's instruction set as oneDNN dispatches on it (`None`: not x86-64, or not
    /// reported by an older worker).
    #[serde(default)]
    pub cpu_isa: Option<CpuIsa>,
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
    /// checkpoints) and this machine's CPU threads and instruction set where the plan
    /// names none.
    pub fn as_run_here(&self, plan: &Plan) -> Plan {
        let mut p = plan.clone();
        p.runtime = Runtime::Headroom;
        // libtorch updates one parameter at a time; there is no foreach or fused path.
        p.optimizer_impl = OptimizerImpl::Auto;
        p.cpu_threads.get_or_insert(self.cpu_threads.max(1));
        // A plan may name an older instruction set than the machine's (the worker then
        // limits oneDNN to it), never a newer one: the machine runs what it has.
        p.cpu_isa = match (p.cpu_isa, self.cpu_isa) {
            (Some(named), Some(here)) => Some(named.min(here)),
            (named, here) => named.or(here),
        };
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_first_gpu_libtorch_can_use_else_the_cpu() {
        let gpu = Machine { cuda_devices: 2, cpu_threads: 8, cpu_isa: None };
        let cpu = Machine { cuda_devices: 0, cpu_threads: 8, cpu_isa: None };
        assert_eq!(gpu.runs_on(DeviceChoice::Auto), Ok(RunsOn::Cuda(0)));
        assert_eq!(cpu.runs_on(DeviceChoice::Auto), Ok(RunsOn::Cpu));
        assert_eq!(gpu.runs_on(DeviceChoice::Cpu), Ok(RunsOn::Cpu));
        assert_eq!(gpu.runs_on(DeviceChoice::Cuda(1)), Ok(RunsOn::Cuda(1)));
        let missing = gpu.runs_on(DeviceChoice::Cuda(2)).expect_err("only two");
        assert_eq!(missing.to_string(), "cuda:2 requested but 2 CUDA devices are visible");
        assert_eq!(RunsOn::Cuda(1).id(), "cuda:1");
    }

    #[test]
    fn the_trainer_runs_its_own_runtime_with_the_machine_threads_and_isa_unless_the_plan_names_them() {
        let machine = Machine { cuda_devices: 0, cpu_threads: 6, cpu_isa: Some(CpuIsa::Avx2) };
        let mut plan = Plan::example_cnn();
        plan.optimizer_impl = OptimizerImpl::Foreach;
        let here = machine.as_run_here(&plan);
        assert_eq!(
            (here.runtime, here.optimizer_impl, here.cpu_threads),
            (Runtime::Headroom, OptimizerImpl::Auto, Some(6))
        );
        assert_eq!(here.cpu_isa, Some(CpuIsa::Avx2), "the machine's instruction set");
        plan.cpu_threads = Some(2);
        plan.cpu_isa = Some(CpuIsa::Sse41);
        let named = machine.as_run_here(&plan);
        assert_eq!((named.cpu_threads, named.cpu_isa), (Some(2), Some(CpuIsa::Sse41)));
        plan.cpu_isa = Some(CpuIsa::Avx512Core);
        assert_eq!(machine.as_run_here(&plan).cpu_isa, Some(CpuIsa::Avx2), "no newer ISA than the machine's");
    }
}
