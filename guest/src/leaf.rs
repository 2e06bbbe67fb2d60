//! Executing CPUID `0x4FFFFFFF` and reading it as [`ExitStats`].

use exitlab_proto::leaf::{ExitStats, LeafError, LEAF};
use raw_cpuid::cpuid;

/// Executes CPUID with EAX = [`LEAF`], ECX = 0. Under the patched KVM this is one VM exit,
/// already counted in the result; its own cycles are not yet in it.
pub fn read() -> Result<ExitStats, LeafError> {
    read_subleaf(0)
}

/// As [`read`], with a chosen ECX (the patched KVM ignores it).
pub fn read_subleaf(ecx: u32) -> Result<ExitStats, LeafError> {
    let r = cpuid!(LEAF, ecx);
    ExitStats::from_regs(r.eax, r.ebx, r.ecx, r.edx)
}

/// Executes CPUID with EAX = `leaf` (a per-reason leaf) and ECX = `reason`; `None` if the
/// registers are not an exit-statistics answer.
pub fn read_reason(leaf: u32, reason: u32) -> Option<exitlab_proto::reasons::ReasonAnswer> {
    let r = cpuid!(leaf, reason);
    exitlab_proto::reasons::ReasonAnswer::from_regs(r.eax, r.ebx, r.ecx, r.edx)
}

/// CPUID's own SDM reason, as leaf 0x4FFFFFFE answers it; `None` if it does not.
pub fn read_cpuid_reason() -> Option<ExitStats> {
    use exitlab_proto::leaf::{LEAF_SDM, SDM_REASON_CPUID};
    use exitlab_proto::reasons::ReasonAnswer;
    match read_reason(LEAF_SDM, SDM_REASON_CPUID)? {
        ReasonAnswer::Stats(s) => Some(s),
        ReasonAnswer::Undefined => None,
    }
}
