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
