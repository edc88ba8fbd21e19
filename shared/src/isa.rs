//! The CPU's instruction set as oneDNN sees it: below both the plan (its `cpu_isa` key)
//! and the machine (what the agent detects and reports).

use serde::{Deserialize, Serialize};

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

    /// Every ISA, oldest first.
    pub const ALL: [CpuIsa; 5] =
        [CpuIsa::Sse41, CpuIsa::Avx2, CpuIsa::Avx512Core, CpuIsa::Avx512CoreBf16, CpuIsa::Avx512CoreAmx];

    /// The ISA an estimate's point assumes where the plan names none: AVX-512 with BF16,
    /// what current server CPUs of both vendors have (AMD since Zen 4; Intel since
    /// Cooper Lake, with AMX since Sapphire Rapids); the interval covers every other.
    pub const DEFAULT: CpuIsa = CpuIsa::Avx512CoreBf16;

    pub fn from_word(word: &str) -> Option<CpuIsa> {
        CpuIsa::ALL.into_iter().find(|i| i.word() == word)
    }

    /// The ISA oneDNN uses when its `ONEDNN_MAX_CPU_ISA` (or older `DNNL_MAX_CPU_ISA`)
    /// says `limit`: the lower of the two; a name this list does not hold (`ALL`, or a
    /// newer ISA) limits nothing modelled here.
    pub fn limited_by(self, limit: Option<&str>) -> CpuIsa {
        let name = limit.map(|l| l.trim().to_ascii_lowercase()).unwrap_or_default();
        // oneDNN's other names, each as the highest ISA modelled here that it includes.
        let cap = CpuIsa::from_word(&name).or(match name.as_str() {
            "avx" => Some(CpuIsa::Sse41),
            "avx2_vnni" | "avx2_vnni_2" => Some(CpuIsa::Avx2),
            "avx512_core_vnni" => Some(CpuIsa::Avx512Core),
            "avx512_core_fp16" | "avx10_1_512" => Some(CpuIsa::Avx512CoreBf16),
            _ => None,
        });
        cap.map_or(self, |cap| self.min(cap))
    }

    /// Whether oneDNN runs bf16 here, which PyTorch asks before it gives oneDNN a bf16
    /// convolution or matrix product (`mkldnn_bf16_device_check`: AVX-512 core or
    /// better; below it they run on libtorch's native kernels).
    pub fn onednn_bf16(self) -> bool {
        self >= CpuIsa::Avx512Core
    }

    /// Channels per block of oneDNN's blocked layouts for fp32 (`nChw16c` with AVX-512,
    /// `nChw8c` below).
    pub fn block(self) -> u64 {
        if self >= CpuIsa::Avx512Core { 16 } else { 8 }
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
        for isa in CpuIsa::ALL {
            assert_eq!(CpuIsa::from_word(isa.word()), Some(isa));
        }
        // oneDNN's own limit, as its environment variable spells it.
        let amx = CpuIsa::Avx512CoreAmx;
        assert_eq!(amx.limited_by(Some("AVX2")), CpuIsa::Avx2);
        assert_eq!(amx.limited_by(Some("avx512_core")), CpuIsa::Avx512Core);
        assert_eq!(CpuIsa::Avx2.limited_by(Some("AVX512_CORE_AMX")), CpuIsa::Avx2);
        assert_eq!(amx.limited_by(Some("ALL")), amx);
        assert_eq!(amx.limited_by(Some("AVX10_1_512_AMX_FP16")), amx, "a newer name limits nothing we model");
        assert_eq!(amx.limited_by(Some("AVX512_CORE_VNNI")), CpuIsa::Avx512Core);
        assert_eq!(amx.limited_by(Some("AVX2_VNNI_2")), CpuIsa::Avx2);
        assert_eq!(amx.limited_by(Some("AVX10_1_512")), CpuIsa::Avx512CoreBf16);
        assert_eq!(amx.limited_by(None), amx);
        assert!(!CpuIsa::Avx2.onednn_bf16() && CpuIsa::Avx512Core.onednn_bf16());
        assert_eq!((CpuIsa::Avx2.block(), CpuIsa::Avx512Core.block()), (8, 16));
    }
}
