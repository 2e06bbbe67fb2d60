//! CPUID leaf `0x4FFFFFFF`: the VM's exit statistics, as the patched KVM reports them.
//!
//! EAX = exits of the whole VM (all vCPUs, all reasons) modulo 2^32; EBX:ECX = high:low
//! halves of the host TSC cycles KVM spent handling them; EDX = 0. See kernel/README.md.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The leaf number (`KVM_CPUID_EXIT_STATS` in the kernel's uapi `asm/kvm_para.h`).
pub const LEAF: u32 = 0x4FFF_FFFF;
/// Exits and cycles of one exit reason in SDM numbering (ECX), on both vendors.
pub const LEAF_SDM: u32 = 0x4FFF_FFFE;
/// Exits and cycles of one vendor exit code (ECX): VMX basic reason, SVM exit code.
pub const LEAF_NATIVE: u32 = 0x4FFF_FFFD;
/// The course's "cycles by reason" leaf: the same answer as [`LEAF_SDM`].
pub const LEAF_SDM_CYCLES: u32 = 0x4FFF_FFFC;
/// The SDM's basic exit reason of CPUID.
pub const SDM_REASON_CPUID: u32 = 10;
/// The native code that counts failed VM-entries and codes KVM does not know: a lookup
/// that costs what any code's does, on either vendor.
pub const NATIVE_OTHER: u32 = 0xFFFF_FFFF;

/// One reading of the leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStats {
    /// VM exits of the whole VM, modulo 2^32.
    pub exits: u32,
    /// Host TSC cycles spent handling those exits.
    pub cycles: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("EDX is {0:#x}, but the exit-statistics leaf always returns EDX = 0: this KVM does not implement leaf 0x4FFFFFFF")]
    NonzeroEdx(u32),
    #[error("not a test_assignment2 line (expected `{PREFIX}<exits>{MIDDLE}<cycles>`): {0:?}")]
    BadLine(String),
}

const PREFIX: &str = "CPUID(0x4FFFFFFF), exits=";
const MIDDLE: &str = ", cycles spent in exit=";

impl ExitStats {
    /// Decode the four registers CPUID returned for [`LEAF`].
    pub fn from_regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Result<Self, LeafError> {
        if edx != 0 {
            return Err(LeafError::NonzeroEdx(edx));
        }
        Ok(Self {
            exits: eax,
            cycles: (u64::from(ebx) << 32) | u64::from(ecx),
        })
    }

    /// All-zero: what the leaf returns with `kvm.exit_accounting=N`, and, for an AMD-vendor
    /// guest, what KVM returns when the leaves are not enabled for the VM or KVM is not
    /// patched.
    pub fn is_zero(&self) -> bool {
        self.exits == 0 && self.cycles == 0
    }

    /// Exits that happened between `self` and a later reading `later`, modulo 2^32.
    pub fn exits_until(&self, later: &ExitStats) -> u32 {
        later.exits.wrapping_sub(self.exits)
    }
}

/// The exact line `test_assignment2` prints.
impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}{MIDDLE}{}", self.exits, self.cycles)
    }
}

/// Parses exactly the line [`Display`](fmt::Display) prints, nothing more or less.
impl FromStr for ExitStats {
    type Err = LeafError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || LeafError::BadLine(line.to_string());
        let rest = line.strip_prefix(PREFIX).ok_or_else(bad)?;
        let (exits, cycles) = rest.split_once(MIDDLE).ok_or_else(bad)?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(exits) || !digits(cycles) {
            return Err(bad());
        }
        Ok(Self {
            exits: exits.parse().map_err(|_| bad())?,
            cycles: cycles.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_registers_high_low() {
        let s = ExitStats::from_regs(32149, 0, 1_028_748_293, 0).unwrap();
        assert_eq!(s.exits, 32149);
        assert_eq!(s.cycles, 1_028_748_293);
        let s = ExitStats::from_regs(u32::MAX, 0x1, 0x2, 0).unwrap();
        assert_eq!(s.exits, u32::MAX);
        assert_eq!(s.cycles, 0x1_0000_0002);
    }

    #[test]
    fn rejects_nonzero_edx() {
        assert_eq!(
            ExitStats::from_regs(1, 2, 3, 4),
            Err(LeafError::NonzeroEdx(4))
        );
    }

    #[test]
    fn prints_the_assignment_format() {
        let s = ExitStats {
            exits: 32149,
            cycles: 1_028_748_293,
        };
        assert_eq!(
            s.to_string(),
            "CPUID(0x4FFFFFFF), exits=32149, cycles spent in exit=1028748293"
        );
    }

    #[test]
    fn parses_what_it_prints_and_nothing_else() {
        let s = ExitStats {
            exits: u32::MAX,
            cycles: u64::MAX,
        };
        assert_eq!(s.to_string().parse::<ExitStats>().unwrap(), s);
        for bad in [
            "",
            "CPUID(0x4FFFFFFF), exits=1, cycles spent in exit=",
            "CPUID(0x4FFFFFFF), exits=-1, cycles spent in exit=2",
            "CPUID(0x4FFFFFFF), exits=1, cycles spent in exit=2 ",
            " CPUID(0x4FFFFFFF), exits=1, cycles spent in exit=2",
            "CPUID(0x4fffffff), exits=1, cycles spent in exit=2",
            "CPUID(0x4FFFFFFF), exits=4294967296, cycles spent in exit=2",
            "CPUID(0x4FFFFFFF), exits=+1, cycles spent in exit=2",
        ] {
            assert!(bad.parse::<ExitStats>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn exit_deltas_wrap() {
        let a = ExitStats {
            exits: u32::MAX - 1,
            cycles: 0,
        };
        let b = ExitStats {
            exits: 3,
            cycles: 0,
        };
        assert_eq!(a.exits_until(&b), 5);
    }
}
