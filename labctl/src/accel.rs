//! How L1 runs on this host: hardware KVM when it really works and exposes VMX/SVM to L1,
//! otherwise QEMU's TCG with a CPU model that has AMD SVM.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use exitlab_proto::vm::{Accel, CpuVirt};

use crate::config::AccelChoice;
use crate::error::setup;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    /// QEMU `-cpu` for L1.
    pub cpu: String,
    /// Why, in one sentence.
    pub reason: String,
}

/// What the host offers for hardware-accelerated nesting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub vmx: bool,
    pub svm: bool,
    /// Result of opening /dev/kvm and creating a VM with it.
    pub kvm: Result<(), String>,
    /// Nested virtualization enabled in the host's kvm_intel/kvm_amd (None: unknown).
    pub nested: Option<bool>,
}

const KVMIO: u8 = 0xAE;
nix::ioctl_none!(kvm_get_api_version, KVMIO, 0x00);
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(KVMIO, 0x01));

fn probe_kvm() -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument.
    let v = unsafe { kvm_get_api_version(f.as_raw_fd()) }
        .map_err(|e| format!("KVM_GET_API_VERSION failed: {e}"))?;
    if v != 12 {
        return Err(format!("/dev/kvm speaks API version {v}, not 12"));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0) and returns a new fd.
    let vm = unsafe { kvm_create_vm(f.as_raw_fd(), 0) }
        .map_err(|e| format!("/dev/kvm exists but KVM_CREATE_VM fails: {e}"))?;
    // SAFETY: vm is a file descriptor we own.
    unsafe { libc::close(vm) };
    Ok(())
}

fn read_nested() -> Option<bool> {
    for p in [
        "/sys/module/kvm_intel/parameters/nested",
        "/sys/module/kvm_amd/parameters/nested",
    ] {
        if let Ok(v) = std::fs::read_to_string(p) {
            return Some(matches!(v.trim(), "Y" | "y" | "1"));
        }
    }
    None
}

impl HostFacts {
    pub fn probe() -> Self {
        let CpuVirt { vmx, svm } = CpuVirt::probe();
        HostFacts {
            vmx,
            svm,
            kvm: probe_kvm(),
            nested: read_nested(),
        }
    }
}

fn tcg(reason: String) -> AccelDecision {
    AccelDecision {
        accel: Accel::Tcg,
        cpu: "max".into(),
        reason,
    }
}

/// Why hardware KVM cannot run the nested lab, or None if it can.
fn kvm_blocker(h: &HostFacts) -> Option<String> {
    if !h.vmx && !h.svm {
        return Some(
            "the host CPU has neither VMX nor SVM (CPUID.1:ECX.VMX = 0, CPUID.80000001h:ECX.SVM = 0)"
                .into(),
        );
    }
    if let Err(e) = &h.kvm {
        return Some(e.clone());
    }
    if h.nested == Some(false) {
        return Some(
            "nested virtualization is off in the host's KVM (enable with the kvm_intel/kvm_amd `nested=1` module parameter)"
                .into(),
        );
    }
    None
}

pub fn decide(choice: AccelChoice, h: &HostFacts) -> anyhow::Result<AccelDecision> {
    let hw = || AccelDecision {
        accel: Accel::Kvm,
        cpu: "host".into(),
        reason: format!(
            "hardware KVM works and exposes {} to L1",
            if h.vmx { "VMX" } else { "SVM" }
        ),
    };
    match choice {
        AccelChoice::Tcg => Ok(tcg(
            "--accel tcg: QEMU emulates the CPU, with AMD SVM (-cpu max) for L1's KVM".into(),
        )),
        AccelChoice::Kvm => match kvm_blocker(h) {
            None => Ok(hw()),
            Some(why) => Err(setup(format!(
                "--accel kvm is not possible here: {why}. Use --accel tcg (or auto), which runs L1 under QEMU's emulation of AMD SVM"
            ))),
        },
        AccelChoice::Auto => Ok(match kvm_blocker(h) {
            None => hw(),
            Some(why) => tcg(format!(
                "{why}, so L1 runs under QEMU TCG with -cpu max (emulated AMD SVM)"
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(vmx: bool, svm: bool, kvm: Result<(), String>, nested: Option<bool>) -> HostFacts {
        HostFacts {
            vmx,
            svm,
            kvm,
            nested,
        }
    }

    #[test]
    fn auto_picks_tcg_without_vmx_or_svm_even_with_dev_kvm() {
        let h = facts(false, false, Ok(()), None);
        let d = decide(AccelChoice::Auto, &h).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert_eq!(d.cpu, "max");
        assert!(d.reason.contains("neither VMX nor SVM"), "{}", d.reason);
    }

    #[test]
    fn auto_picks_kvm_only_when_it_works_and_nests() {
        let ok = facts(true, false, Ok(()), Some(true));
        assert_eq!(decide(AccelChoice::Auto, &ok).unwrap().accel, Accel::Kvm);
        let broken = facts(true, false, Err("KVM_CREATE_VM fails".into()), Some(true));
        assert_eq!(
            decide(AccelChoice::Auto, &broken).unwrap().accel,
            Accel::Tcg
        );
        let no_nest = facts(false, true, Ok(()), Some(false));
        let d = decide(AccelChoice::Auto, &no_nest).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("nested"), "{}", d.reason);
    }

    #[test]
    fn kvm_fails_clearly_and_tcg_always_works() {
        let h = facts(false, false, Err("cannot open /dev/kvm".into()), None);
        let e = decide(AccelChoice::Kvm, &h).unwrap_err().to_string();
        assert!(
            e.contains("not possible") && e.contains("--accel tcg"),
            "{e}"
        );
        assert_eq!(decide(AccelChoice::Tcg, &h).unwrap().accel, Accel::Tcg);
    }
}
