//! The course's next assignment: for every SDM basic exit reason, executes CPUID
//! 0x4FFFFFFE with ECX = the reason and prints one line each:
//! `CPUID(0x4FFFFFFE), exit reason 10 (CPUID), exits=<EAX>, cycles spent in exit=<EBX:ECX>`,
//! or `..., exit reason 35 (undefined), not defined (EDX=0xFFFFFFFF)`.
//! `--native` walks the vendor's own exit codes through leaf 0x4FFFFFFD instead; reasons
//! (numbers or names) given as arguments restrict the walk to them.

use std::process::ExitCode;

use exitlab_proto::leaf::{LEAF_NATIVE, LEAF_SDM, SDM_REASON_CPUID};
use exitlab_proto::reasons::{self, ReasonAnswer, ReasonLine, Vendor};
use raw_cpuid::cpuid;

const USAGE: &str = "usage: test_assignment3 [--native] [REASON...]
  walks every SDM basic exit reason through CPUID 0x4FFFFFFE (with --native: the CPU
  vendor's exit codes through 0x4FFFFFFD); REASONs (numbers, 0x..., or names such as
  CPUID, HLT, EPT_VIOLATION, NPF) restrict the walk to them";

fn vendor() -> Option<Vendor> {
    let r = cpuid!(0);
    let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    Vendor::from_cpuid_vendor(&String::from_utf8_lossy(&bytes))
}

fn run(args: &[String]) -> Result<(), (u8, String)> {
    let usage = |msg: String| (2, format!("{msg}\n{USAGE}"));
    let native = args.iter().any(|a| a == "--native");
    if let Some(flag) = args.iter().find(|a| a.starts_with('-') && *a != "--native") {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        return Err(usage(format!("unknown option {flag:?}")));
    }
    let vendor = vendor().ok_or_else(|| {
        (
            1,
            "the CPU vendor is neither Intel nor AMD: the exit reasons' numbering is unknown"
                .to_string(),
        )
    })?;
    let named: Vec<&String> = args.iter().filter(|a| *a != "--native").collect();
    let reasons: Vec<u32> = if named.is_empty() {
        if native {
            vendor.native_codes()
        } else {
            (0..=reasons::SDM_LAST).collect()
        }
    } else {
        named
            .iter()
            .map(|a| {
                if native {
                    reasons::parse_native(vendor, a)
                } else {
                    reasons::parse_sdm(a)
                }
            })
            .collect::<Result<_, _>>()
            .map_err(|e| usage(e.to_string()))?
    };

    // The total first: it says whether this KVM answers the leaves at all.
    match exitlab_guest::leaf::read() {
        Err(e) => return Err((1, format!("{e}"))),
        Ok(s) if s.is_zero() => {
            return Err((
                1,
                "CPUID 0x4FFFFFFF read all zeros: this KVM is not patched, its exit accounting \
                 is off (kvm.exit_accounting=N), or this VM has not enabled the exit-statistics \
                 leaves (kvm.exit_stats_leaves=1 or KVM_CAP_X86_EXIT_STATS)"
                    .to_string(),
            ))
        }
        Ok(_) => {}
    }

    let leaf = if native { LEAF_NATIVE } else { LEAF_SDM };
    let cpuid_reason = match (native, vendor) {
        (true, Vendor::Amd) => 0x72,
        _ => SDM_REASON_CPUID,
    };
    for reason in reasons {
        let r = cpuid!(leaf, reason);
        let answer = ReasonAnswer::from_regs(r.eax, r.ebx, r.ecx, r.edx).ok_or_else(|| {
            (
                1,
                format!(
                    "CPUID({leaf:#X}, {reason:#x}) returned EAX={:#x} EBX={:#x} ECX={:#x} EDX={:#x}, \
                     which is not an exit-statistics answer: this KVM does not implement the \
                     per-reason leaves",
                    r.eax, r.ebx, r.ecx, r.edx
                ),
            )
        })?;
        if reason == cpuid_reason && matches!(answer, ReasonAnswer::Stats(s) if s.exits == 0) {
            return Err((
                1,
                format!(
                    "CPUID({leaf:#X}) says CPUID caused no exit, after this program executed \
                     several: this KVM does not count exits by reason"
                ),
            ));
        }
        let name = if native {
            vendor.native_name(reason)
        } else {
            reasons::sdm_name(reason).map(str::to_string)
        };
        println!(
            "{}",
            ReasonLine {
                leaf,
                reason,
                name,
                answer
            }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("test_assignment3: {msg}");
            ExitCode::from(code)
        }
    }
}
