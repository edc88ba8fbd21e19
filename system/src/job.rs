//! What the agent hands a job besides its plan: the files it may use on this machine
//! (chosen by the agent, never by the plan, and passed on the worker's command line),
//! and the format of the worker probe's one-line report.

use std::path::PathBuf;

use shared::machine::Machine;

/// Files a job may use on the agent's machine, chosen by the agent (never by the plan):
/// where checkpoints go and the checkpoint to resume from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFiles {
    pub checkpoint_dir: Option<PathBuf>,
    /// A `step-N` checkpoint, or a checkpoint directory (its newest is taken).
    pub resume: Option<PathBuf>,
    /// The folder a plan's `data` and `data_labels` paths are relative to; nothing
    /// outside it is read.
    pub data_root: Option<PathBuf>,
    /// An exported model's file as its local user named it (`headroom run --model-file`);
    /// an agent leaves it unset, and its workers read a plan's model file under the data
    /// root instead.
    pub weights: Option<PathBuf>,
}

/// The worker probe's report, one JSON line on its standard output.
pub fn probe_line(machine: &Machine) -> String {
    serde_json::to_string(machine).unwrap_or_default()
}

/// Reads a probe's report; `None` for anything else.
pub fn parse_probe(stdout: &str) -> Option<Machine> {
    let machine: Machine = serde_json::from_str(stdout.lines().rev().find(|l| !l.trim().is_empty())?).ok()?;
    (machine.cpu_threads >= 1).then_some(machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_report_reads_back_and_anything_else_is_refused() {
        let m = Machine { cuda_devices: 2, cpu_threads: 16, cpu_isa: Some(shared::machine::CpuIsa::Avx512CoreAmx) };
        assert_eq!(parse_probe(&format!("{}\n", probe_line(&m))), Some(m));
        assert_eq!(parse_probe("2\n"), None);
        assert_eq!(parse_probe(""), None);
        assert_eq!(parse_probe(r#"{"cuda_devices":1,"cpu_threads":0}"#), None);
    }
}
