//! Exit reasons, numbered and named once for the guest programs and labctl: the SDM's
//! basic exit reasons (what leaves `0x4FFFFFFE`/`0x4FFFFFFC` take in ECX, on both
//! vendors) and the vendors' native codes (what leaf `0x4FFFFFFD` takes), and the line
//! `test_assignment3` prints for each.

use std::fmt;
use std::str::FromStr;

use crate::leaf::{ExitStats, LEAF_NATIVE, LEAF_SDM};

/// The SDM's basic exit reasons (Vol. 3D, Table C-1), by number; `None`: not defined.
/// Names as the kernel's `uapi/asm/vmx.h` spells them, without `EXIT_REASON_`.
pub const SDM_REASONS: [Option<&str>; 78] = [
    Some("EXCEPTION_NMI"),
    Some("EXTERNAL_INTERRUPT"),
    Some("TRIPLE_FAULT"),
    Some("INIT_SIGNAL"),
    Some("SIPI_SIGNAL"),
    Some("IO_SMI"),
    Some("OTHER_SMI"),
    Some("INTERRUPT_WINDOW"),
    Some("NMI_WINDOW"),
    Some("TASK_SWITCH"),
    Some("CPUID"),
    Some("GETSEC"),
    Some("HLT"),
    Some("INVD"),
    Some("INVLPG"),
    Some("RDPMC"),
    Some("RDTSC"),
    Some("RSM"),
    Some("VMCALL"),
    Some("VMCLEAR"),
    Some("VMLAUNCH"),
    Some("VMPTRLD"),
    Some("VMPTRST"),
    Some("VMREAD"),
    Some("VMRESUME"),
    Some("VMWRITE"),
    Some("VMOFF"),
    Some("VMON"),
    Some("CR_ACCESS"),
    Some("DR_ACCESS"),
    Some("IO_INSTRUCTION"),
    Some("MSR_READ"),
    Some("MSR_WRITE"),
    Some("INVALID_STATE"),
    Some("MSR_LOAD_FAIL"),
    None,
    Some("MWAIT_INSTRUCTION"),
    Some("MONITOR_TRAP_FLAG"),
    None,
    Some("MONITOR_INSTRUCTION"),
    Some("PAUSE_INSTRUCTION"),
    Some("MCE_DURING_VMENTRY"),
    None,
    Some("TPR_BELOW_THRESHOLD"),
    Some("APIC_ACCESS"),
    Some("EOI_INDUCED"),
    Some("GDTR_IDTR"),
    Some("LDTR_TR"),
    Some("EPT_VIOLATION"),
    Some("EPT_MISCONFIG"),
    Some("INVEPT"),
    Some("RDTSCP"),
    Some("PREEMPTION_TIMER"),
    Some("INVVPID"),
    Some("WBINVD"),
    Some("XSETBV"),
    Some("APIC_WRITE"),
    Some("RDRAND"),
    Some("INVPCID"),
    Some("VMFUNC"),
    Some("ENCLS"),
    Some("RDSEED"),
    Some("PML_FULL"),
    Some("XSAVES"),
    Some("XRSTORS"),
    Some("PCONFIG"),
    Some("SPP"),
    Some("UMWAIT"),
    Some("TPAUSE"),
    Some("LOADIWKEY"),
    Some("ENCLV"),
    None,
    Some("ENQCMD_PASID_FAIL"),
    Some("ENQCMDS_PASID_FAIL"),
    Some("BUS_LOCK"),
    Some("NOTIFY"),
    Some("SEAMCALL"),
    Some("TDCALL"),
];

/// The last SDM basic exit reason the leaves know (TDCALL).
pub const SDM_LAST: u32 = SDM_REASONS.len() as u32 - 1;

/// The SDM name of `reason`, if the SDM defines it.
pub fn sdm_name(reason: u32) -> Option<&'static str> {
    SDM_REASONS.get(reason as usize).copied().flatten()
}

/// SVM exit codes `0x60..=0xA2` by code, as `uapi/asm/svm.h` names them (no `SVM_EXIT_`).
const SVM_NAMED: [&str; 0xA3 - 0x60] = [
    "INTR",
    "NMI",
    "SMI",
    "INIT",
    "VINTR",
    "CR0_SEL_WRITE",
    "IDTR_READ",
    "GDTR_READ",
    "LDTR_READ",
    "TR_READ",
    "IDTR_WRITE",
    "GDTR_WRITE",
    "LDTR_WRITE",
    "TR_WRITE",
    "RDTSC",
    "RDPMC",
    "PUSHF",
    "POPF",
    "CPUID",
    "RSM",
    "IRET",
    "SWINT",
    "INVD",
    "PAUSE",
    "HLT",
    "INVLPG",
    "INVLPGA",
    "IOIO",
    "MSR",
    "TASK_SWITCH",
    "FERR_FREEZE",
    "SHUTDOWN",
    "VMRUN",
    "VMMCALL",
    "VMLOAD",
    "VMSAVE",
    "STGI",
    "CLGI",
    "SKINIT",
    "RDTSCP",
    "ICEBP",
    "WBINVD",
    "MONITOR",
    "MWAIT",
    "MWAIT_COND",
    "XSETBV",
    "RDPRU",
    "EFER_WRITE_TRAP",
    "CR0_WRITE_TRAP",
    "CR1_WRITE_TRAP",
    "CR2_WRITE_TRAP",
    "CR3_WRITE_TRAP",
    "CR4_WRITE_TRAP",
    "CR5_WRITE_TRAP",
    "CR6_WRITE_TRAP",
    "CR7_WRITE_TRAP",
    "CR8_WRITE_TRAP",
    "CR9_WRITE_TRAP",
    "CR10_WRITE_TRAP",
    "CR11_WRITE_TRAP",
    "CR12_WRITE_TRAP",
    "CR13_WRITE_TRAP",
    "CR14_WRITE_TRAP",
    "CR15_WRITE_TRAP",
    "0xA0",
    "0xA1",
    "INVPCID",
];

/// The vendor whose native exit codes leaf `0x4FFFFFFD` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// VMX basic exit reasons (the SDM's numbering).
    Intel,
    /// SVM exit codes.
    Amd,
}

impl Vendor {
    /// The vendor of a CPUID vendor string (leaf 0: EBX, EDX, ECX).
    pub fn from_cpuid_vendor(s: &str) -> Option<Self> {
        match s {
            "GenuineIntel" => Some(Vendor::Intel),
            "AuthenticAMD" | "HygonGenuine" => Some(Vendor::Amd),
            _ => None,
        }
    }

    /// Every native code KVM has a slot for, in order.
    pub fn native_codes(self) -> Vec<u32> {
        match self {
            // KVM's VMX slots: basic reasons 0..=81 (the SDM's and a few KVM knows).
            Vendor::Intel => (0..=81).collect(),
            Vendor::Amd => (0..=0xA2).chain(0x400..=0x403).collect(),
        }
    }

    /// The name of a native code, or `None` if it has none.
    pub fn native_name(self, code: u32) -> Option<String> {
        match self {
            Vendor::Intel => sdm_name(code).map(str::to_string),
            Vendor::Amd => match code {
                0x00..=0x0F => Some(format!("READ_CR{code}")),
                0x10..=0x1F => Some(format!("WRITE_CR{}", code - 0x10)),
                0x20..=0x2F => Some(format!("READ_DR{}", code - 0x20)),
                0x30..=0x3F => Some(format!("WRITE_DR{}", code - 0x30)),
                0x40..=0x5F => Some(format!("EXCP_{}", code - 0x40)),
                0x60..=0xA2 => Some(SVM_NAMED[(code - 0x60) as usize].to_string()),
                0x400 => Some("NPF".into()),
                0x401 => Some("AVIC_INCOMPLETE_IPI".into()),
                0x402 => Some("AVIC_UNACCELERATED_ACCESS".into()),
                0x403 => Some("VMGEXIT".into()),
                _ => None,
            },
        }
    }
}

/// A reason given on a command line that is neither a known number nor a known name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReasonError {
    #[error("unknown exit reason {0:?}: give an SDM basic exit reason 0..={SDM_LAST} or its name (CPUID, HLT, EPT_VIOLATION, ...)")]
    UnknownSdm(String),
    #[error("exit reason {0} is not defined in the SDM (undefined: 35, 38, 42, 71)")]
    UndefinedSdm(u32),
    #[error("unknown native exit code {0:?} for this vendor: give a number (decimal or 0x...) or a name (CPUID, HLT, NPF, ...)")]
    UnknownNative(String),
}

fn parse_number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// An SDM basic exit reason from a number or a name (case-insensitive); undefined
/// reasons are an error.
pub fn parse_sdm(s: &str) -> Result<u32, ReasonError> {
    let n = match parse_number(s) {
        Some(n) if n <= SDM_LAST => n,
        Some(_) => return Err(ReasonError::UnknownSdm(s.into())),
        None => SDM_REASONS
            .iter()
            .position(|r| r.is_some_and(|name| name.eq_ignore_ascii_case(s)))
            .ok_or_else(|| ReasonError::UnknownSdm(s.into()))? as u32,
    };
    if sdm_name(n).is_none() {
        return Err(ReasonError::UndefinedSdm(n));
    }
    Ok(n)
}

/// A native exit code of `vendor` from a number or a name (case-insensitive).
pub fn parse_native(vendor: Vendor, s: &str) -> Result<u32, ReasonError> {
    let codes = vendor.native_codes();
    let found = match parse_number(s) {
        Some(n) => codes.contains(&n).then_some(n),
        None => codes.iter().copied().find(|&c| {
            vendor
                .native_name(c)
                .is_some_and(|name| name.eq_ignore_ascii_case(s))
        }),
    };
    found.ok_or_else(|| ReasonError::UnknownNative(s.into()))
}

/// What a per-reason leaf answered for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonAnswer {
    /// Exits (mod 2^32) and cycles; zeros for a reason KVM has no handler for.
    Stats(ExitStats),
    /// EDX = 0xFFFFFFFF: the reason is not defined (SDM view) or not known (native view).
    Undefined,
}

impl ReasonAnswer {
    /// Decodes the registers of leaf `0x4FFFFFFE`, `0x4FFFFFFC` or `0x4FFFFFFD`.
    pub fn from_regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Option<Self> {
        match edx {
            0 => ExitStats::from_regs(eax, ebx, ecx, 0).ok().map(Self::Stats),
            u32::MAX if eax == 0 && ebx == 0 && ecx == 0 => Some(Self::Undefined),
            _ => None,
        }
    }
}

/// One line of `test_assignment3`: a reason, its name, and what the leaf answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasonLine {
    /// [`LEAF_SDM`] or [`LEAF_NATIVE`].
    pub leaf: u32,
    pub reason: u32,
    pub name: Option<String>,
    pub answer: ReasonAnswer,
}

impl fmt::Display for ReasonLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unnamed = if self.leaf == LEAF_NATIVE {
            "unnamed"
        } else {
            "undefined"
        };
        let name = self.name.as_deref().unwrap_or(unnamed);
        if self.leaf == LEAF_NATIVE {
            write!(
                f,
                "CPUID({:#X}), exit code {:#x} ({name})",
                self.leaf, self.reason
            )?;
        } else {
            write!(
                f,
                "CPUID({:#X}), exit reason {} ({name})",
                self.leaf, self.reason
            )?;
        }
        match self.answer {
            ReasonAnswer::Stats(s) => {
                write!(f, ", exits={}, cycles spent in exit={}", s.exits, s.cycles)
            }
            ReasonAnswer::Undefined => write!(f, ", not defined (EDX=0xFFFFFFFF)"),
        }
    }
}

/// A whole SDM walk as `test_assignment3` prints it, every reason 0..=[`SDM_LAST`] in
/// order, from what the leaf answers for each defined reason (undefined ones are marked).
pub fn sdm_walk(mut answer: impl FnMut(u32) -> ExitStats) -> Vec<ReasonLine> {
    (0..=SDM_LAST)
        .map(|reason| ReasonLine {
            leaf: LEAF_SDM,
            reason,
            name: sdm_name(reason).map(str::to_string),
            answer: match sdm_name(reason) {
                Some(_) => ReasonAnswer::Stats(answer(reason)),
                None => ReasonAnswer::Undefined,
            },
        })
        .collect()
}

/// Parses exactly what [`ReasonLine`]'s `Display` prints.
impl FromStr for ReasonLine {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a test_assignment3 line: {line:?}");
        let (leaf, rest, native) =
            if let Some(r) = line.strip_prefix("CPUID(0x4FFFFFFE), exit reason ") {
                (LEAF_SDM, r, false)
            } else if let Some(r) = line.strip_prefix("CPUID(0x4FFFFFFD), exit code 0x") {
                (LEAF_NATIVE, r, true)
            } else {
                return Err(bad());
            };
        let (num, rest) = rest.split_once(" (").ok_or_else(bad)?;
        let reason = if native {
            u32::from_str_radix(num, 16).map_err(|_| bad())?
        } else {
            num.parse().map_err(|_| bad())?
        };
        let (name, rest) = rest.split_once(')').ok_or_else(bad)?;
        let answer = if rest == ", not defined (EDX=0xFFFFFFFF)" {
            ReasonAnswer::Undefined
        } else {
            let rest = rest.strip_prefix(", exits=").ok_or_else(bad)?;
            let (exits, cycles) = rest.split_once(", cycles spent in exit=").ok_or_else(bad)?;
            ReasonAnswer::Stats(ExitStats {
                exits: exits.parse().map_err(|_| bad())?,
                cycles: cycles.parse().map_err(|_| bad())?,
            })
        };
        Ok(Self {
            leaf,
            reason,
            name: (name != "undefined" && name != "unnamed").then(|| name.to_string()),
            answer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdm_table_matches_the_kernels_defined_set() {
        let undefined: Vec<u32> = (0..=SDM_LAST).filter(|&r| sdm_name(r).is_none()).collect();
        assert_eq!(undefined, [35, 38, 42, 71]);
        assert_eq!(sdm_name(10), Some("CPUID"));
        assert_eq!(sdm_name(12), Some("HLT"));
        assert_eq!(sdm_name(48), Some("EPT_VIOLATION"));
        assert_eq!(sdm_name(77), Some("TDCALL"));
        assert_eq!(sdm_name(78), None);
    }

    #[test]
    fn svm_names_follow_the_uapi_header() {
        let amd = Vendor::Amd;
        assert_eq!(amd.native_name(0x72).as_deref(), Some("CPUID"));
        assert_eq!(amd.native_name(0x78).as_deref(), Some("HLT"));
        assert_eq!(amd.native_name(0x7B).as_deref(), Some("IOIO"));
        assert_eq!(amd.native_name(0x7C).as_deref(), Some("MSR"));
        assert_eq!(amd.native_name(0x8F).as_deref(), Some("EFER_WRITE_TRAP"));
        assert_eq!(amd.native_name(0x9F).as_deref(), Some("CR15_WRITE_TRAP"));
        assert_eq!(amd.native_name(0xA2).as_deref(), Some("INVPCID"));
        assert_eq!(amd.native_name(0x4E).as_deref(), Some("EXCP_14"));
        assert_eq!(amd.native_name(0x400).as_deref(), Some("NPF"));
        assert_eq!(amd.native_name(0xA3), None);
        assert_eq!(amd.native_codes().len(), 0xA3 + 4);
    }

    #[test]
    fn reasons_parse_by_number_or_name_and_bad_ones_say_what_to_do() {
        assert_eq!(parse_sdm("10"), Ok(10));
        assert_eq!(parse_sdm("cpuid"), Ok(10));
        assert_eq!(parse_sdm("0x30"), Ok(48));
        assert_eq!(parse_sdm("35"), Err(ReasonError::UndefinedSdm(35)));
        for bad in ["78", "-1", "", "CPUIDX", "4294967295"] {
            let e = parse_sdm(bad).unwrap_err();
            assert!(e.to_string().contains("give an SDM"), "{bad}: {e}");
        }
        assert_eq!(parse_native(Vendor::Amd, "npf"), Ok(0x400));
        assert_eq!(parse_native(Vendor::Amd, "0x72"), Ok(0x72));
        assert_eq!(parse_native(Vendor::Amd, "114"), Ok(0x72));
        assert!(parse_native(Vendor::Amd, "0x404").is_err());
        assert_eq!(parse_native(Vendor::Intel, "EPT_VIOLATION"), Ok(48));
    }

    #[test]
    fn lines_print_and_parse_back() {
        let cpuid = ReasonLine {
            leaf: LEAF_SDM,
            reason: 10,
            name: Some("CPUID".into()),
            answer: ReasonAnswer::Stats(ExitStats {
                exits: 1234,
                cycles: 567_890,
            }),
        };
        assert_eq!(
            cpuid.to_string(),
            "CPUID(0x4FFFFFFE), exit reason 10 (CPUID), exits=1234, cycles spent in exit=567890"
        );
        for line in [
            cpuid,
            ReasonLine {
                leaf: LEAF_SDM,
                reason: 35,
                name: None,
                answer: ReasonAnswer::Undefined,
            },
            ReasonLine {
                leaf: LEAF_NATIVE,
                reason: 0x400,
                name: Some("NPF".into()),
                answer: ReasonAnswer::Stats(ExitStats {
                    exits: 7,
                    cycles: 9,
                }),
            },
        ] {
            let s = line.to_string();
            assert_eq!(s.parse::<ReasonLine>(), Ok(line), "{s}");
        }
        assert!(
            "CPUID(0x4FFFFFFE), exit reason x (CPUID), exits=1, cycles spent in exit=2"
                .parse::<ReasonLine>()
                .is_err()
        );
    }

    #[test]
    fn answers_decode_registers() {
        assert_eq!(
            ReasonAnswer::from_regs(0, 0, 0, u32::MAX),
            Some(ReasonAnswer::Undefined)
        );
        assert_eq!(
            ReasonAnswer::from_regs(3, 0, 4, 0),
            Some(ReasonAnswer::Stats(ExitStats {
                exits: 3,
                cycles: 4
            }))
        );
        assert_eq!(ReasonAnswer::from_regs(1, 0, 0, 5), None);
    }
}
