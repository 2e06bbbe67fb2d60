//! How the lab launches a VM: QEMU's arguments, the serial port layout, the kernel command
//! line, and where things live inside the L1 image. Used by labctl for L1 and by L1's init
//! for L2, so both levels are wired the same way:
//!
//! - COM1 / `ttyS0`: the kernel console (kept as a log file by whoever launched the VM);
//! - COM2 / `ttyS1`: the protocol channel ([`crate::msg`]).

use serde::{Deserialize, Serialize};

/// What this CPU offers for hardware virtualization, from CPUID: labctl asks it of the
/// host (to choose KVM or TCG for L1), and each VM's init reports it in its `Hello`
/// (L2 must see SVM or VMX to run nested guests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuVirt {
    /// Intel VT-x: CPUID.1:ECX.VMX.
    pub vmx: bool,
    /// AMD-V: CPUID.80000001h:ECX.SVM.
    pub svm: bool,
}

impl CpuVirt {
    pub fn probe() -> Self {
        let id = raw_cpuid::CpuId::new();
        CpuVirt {
            vmx: id.get_feature_info().is_some_and(|f| f.has_vmx()),
            svm: id
                .get_extended_processor_and_feature_identifiers()
                .is_some_and(|f| f.has_svm()),
        }
    }

    pub fn any(self) -> bool {
        self.vmx || self.svm
    }
}

/// Paths inside the L1 image.
pub mod l1 {
    pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
    pub const FIRMWARE_DIR: &str = "/usr/share/qemu";
    pub const KERNEL: &str = "/boot/bzImage";
    pub const GUEST_BIN_DIR: &str = "/guest";
    pub const SELFTEST: &str = "/kselftest/exit_stats_test";
}

/// Firmware files QEMU needs for `-M pc` with `-kernel`, and for `-M microvm` (qboot),
/// looked up in `-L`.
pub const FIRMWARE: &[&str] = &[
    "bios-256k.bin",
    "linuxboot_dma.bin",
    "kvmvapic.bin",
    "bios-microvm.bin",
];

/// The protocol serial port inside a VM.
pub const PROTO_TTY: &str = "/dev/ttyS1";
/// The kernel command line's `KEY=value` that names the protocol port's device (under
/// /dev) when it is not [`PROTO_TTY`]; the kernel hands it to init as an environment
/// variable.
pub const PROTO_ENV: &str = "EXITLAB_PROTO";

/// How a VM's console and protocol port reach QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// COM1 and COM2 (16550 UARTs): every byte is a port I/O exit, and a console that
    /// works from the kernel's first line (record-boot's phases are console lines).
    Serial,
    /// A `microvm` machine (no PCI, no legacy devices, qboot instead of SeaBIOS) with a
    /// virtio console (`hvc0`) and a virtio serial port named [`PROTO_PORT_NAME`], each
    /// on a virtio-serial device of its own: a write is one exit, not one per byte.
    /// Nested under TCG that is the difference between seconds and milliseconds for a
    /// boot log or a program's output. The console's device has a single port, which the
    /// guest adds when it probes the device, before init opens /dev/console; the
    /// protocol's is a serial port, not a console, because QEMU drops a console's data
    /// when its chardev would block, and throttles a serial port instead.
    Virtio,
}

/// The name of the protocol's virtio serial port (in /sys/class/virtio-ports/*/name).
pub const PROTO_PORT_NAME: &str = "exitlab.proto";

/// The machine QEMU models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// A PC (`-M pc`): SeaBIOS, PCI, ACPI, the legacy devices; UARTs or virtio-pci.
    Pc,
    /// A `microvm`: qboot instead of SeaBIOS, virtio-mmio, no PCI bus, no PS/2
    /// controller, PIT, PIC, RTC, option ROMs or ISA serial port; little to probe, so L2 boots
    /// ~0.85 s faster nested under TCG. Only with [`Ports::Virtio`]. The lab's own L2.
    #[default]
    Microvm,
}

impl Machine {
    /// QEMU's `-machine` value.
    pub fn arg(&self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Microvm => "microvm,x-option-roms=off,isa-serial=off,rtc=off,pit=off,pic=off",
        }
    }
}

impl Ports {
    /// The kernel's `console=` and, for virtio, where init finds the protocol port.
    pub fn cmdline(&self) -> &'static str {
        match self {
            Ports::Serial => "console=ttyS0",
            Ports::Virtio => "console=hvc0 EXITLAB_PROTO=exitlab.proto",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Multi-threaded TCG: one host thread per vCPU.
    Tcg,
    /// Single-threaded TCG with `-icount shift=0,sleep=off`: the guest's clock advances
    /// exactly 1 ns per executed instruction, so durations count instructions.
    TcgIcount,
}

impl Accel {
    /// Short name, as results files report it.
    pub fn name(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::TcgIcount => "tcg-icount",
        }
    }
}

/// Where a serial port's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chardev {
    /// QEMU's stdin/stdout.
    Stdio,
    /// Appended to a file.
    File(String),
    /// A Unix socket that the launcher listens on; QEMU connects.
    Socket(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub qemu: String,
    /// `-L`: where QEMU finds its firmware (needed when QEMU is not where it was installed).
    pub firmware_dir: Option<String>,
    pub accel: Accel,
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: String,
    pub initrd: String,
    pub append: String,
    pub console: Chardev,
    pub proto: Chardev,
    pub ports: Ports,
    /// A microvm needs `ports` to be [`Ports::Virtio`] (it has no second UART).
    pub machine: Machine,
    /// Disks, in order (the first is the guest's `/dev/vda`).
    pub disks: Vec<Disk>,
    /// A QMP socket the launcher can connect to (QEMU listens; it does not wait).
    pub qmp: Option<String>,
}

/// A raw disk image on virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: String,
    pub writes: DiskWrites,
}

/// What becomes of what the guest writes to a [`Disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskWrites {
    /// Kept in a temporary overlay and dropped with QEMU: the image is never changed
    /// (`snapshot=on`), so one image serves every boot.
    Discarded,
    /// Written to the image, never flushed to stable storage (`cache=unsafe`): for a
    /// scratch copy that lives only as long as the VM.
    Unflushed,
}

impl Disk {
    fn args(&self) -> Vec<String> {
        let writes = match self.writes {
            DiskWrites::Discarded => "snapshot=on",
            DiskWrites::Unflushed => "cache=unsafe",
        };
        vec![
            "-drive".into(),
            format!("file={},if=virtio,format=raw,{writes}", esc(&self.path)),
        ]
    }
}

/// QEMU option values are comma separated; a literal comma is written twice.
pub fn esc(path: &str) -> String {
    path.replace(',', ",,")
}

impl Chardev {
    fn args(&self, id: &str) -> Vec<String> {
        let backend = match self {
            Chardev::Stdio => format!("stdio,id={id},signal=off"),
            Chardev::File(p) => format!("file,id={id},path={}", esc(p)),
            Chardev::Socket(p) => format!("socket,id={id},path={}", esc(p)),
        };
        vec!["-chardev".into(), backend]
    }
}

/// Kernel command line of every lab VM on serial ports, before level-specific additions.
///
/// `panic=-1` reboots at once on a panic, and `-no-reboot` turns that into QEMU exiting,
/// so a panicking guest never hangs the lab.
pub fn kernel_cmdline(extra: &str) -> String {
    kernel_cmdline_for(Ports::Serial, extra)
}

/// [`kernel_cmdline`] for a VM whose console and protocol port are `ports`.
pub fn kernel_cmdline_for(ports: Ports, extra: &str) -> String {
    let base = format!("{} panic=-1 oops=panic rdinit=/init", ports.cmdline());
    if extra.is_empty() {
        base
    } else {
        format!("{base} {extra}")
    }
}

impl VmSpec {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
        if let Some(dir) = &self.firmware_dir {
            a.extend(["-L".into(), dir.clone()]);
        }
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi",
            Accel::TcgIcount => "tcg,thread=single",
        };
        let machine = match (self.ports, self.machine) {
            // A microvm has one UART at most: serial ports always mean a PC.
            (Ports::Serial, _) => Machine::Pc,
            (Ports::Virtio, m) => m,
        };
        if self.accel == Accel::TcgIcount {
            a.extend(["-icount".into(), "shift=0,sleep=off".into()]);
        }
        a.extend([
            "-machine".into(),
            machine.arg().into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            self.cpu.clone(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.clone(),
            "-initrd".into(),
            self.initrd.clone(),
            "-append".into(),
            self.append.clone(),
        ]);
        a.extend(self.console.args("console"));
        a.extend(self.proto.args("proto"));
        match self.ports {
            Ports::Serial => a.extend([
                "-serial".into(),
                "chardev:console".into(),
                "-serial".into(),
                "chardev:proto".into(),
            ]),
            // ioeventfd off: a notification is handled before the vCPU resumes, instead
            // of the guest spinning until QEMU's main loop gets to it.
            Ports::Virtio => {
                let (device, ioeventfd) = match machine {
                    Machine::Pc => ("virtio-serial-pci", ",ioeventfd=off"),
                    Machine::Microvm => ("virtio-serial-device", ""),
                };
                if machine == Machine::Microvm {
                    // The transports are the machine's own: their property, set globally.
                    a.extend(["-global".into(), "virtio-mmio.ioeventfd=off".into()]);
                }
                a.extend([
                    "-device".into(),
                    format!("{device},id=vser0,max_ports=1{ioeventfd}"),
                    "-device".into(),
                    "virtconsole,bus=vser0.0,chardev=console".into(),
                    "-device".into(),
                    format!("{device},id=vser1,max_ports=2{ioeventfd}"),
                    "-device".into(),
                    format!("virtserialport,bus=vser1.0,nr=1,chardev=proto,name={PROTO_PORT_NAME}"),
                ])
            }
        }
        for d in &self.disks {
            a.extend(d.args());
        }
        if let Some(q) = &self.qmp {
            a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", esc(q))]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PC on serial ports, no disk, no QMP.
    fn pc() -> VmSpec {
        VmSpec {
            qemu: "qemu".into(),
            firmware_dir: Some("/usr/share/qemu".into()),
            accel: Accel::Kvm,
            cpu: "host".into(),
            vcpus: 4,
            memory_mib: 256,
            kernel: "/boot/bzImage".into(),
            initrd: "/tmp/l2.cpio".into(),
            append: kernel_cmdline(""),
            console: Chardev::Stdio,
            proto: Chardev::Socket("/run/a,b.sock".into()),
            ports: Ports::Serial,
            machine: Machine::Pc,
            disks: vec![],
            qmp: None,
        }
    }

    /// The value after each `flag` in `args`, in order.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn console_is_com1_and_proto_is_com2() {
        let a = pc().args();
        assert_eq!(values(&a, "-serial"), ["chardev:console", "chardev:proto"]);
        assert!(a.contains(&"socket,id=proto,path=/run/a,,b.sock".to_string()));
        assert!(a.windows(2).any(|w| w == ["-smp", "4"]));
        assert!(a.windows(2).any(|w| w == ["-m", "256M"]));
        assert!(a.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn disks_and_qmp_are_typed_and_escaped() {
        let spec = VmSpec {
            disks: vec![
                Disk {
                    path: "/img/a,b.raw".into(),
                    writes: DiskWrites::Discarded,
                },
                Disk {
                    path: "/dev/vda".into(),
                    writes: DiskWrites::Unflushed,
                },
            ],
            qmp: Some("/run/q,1.sock".into()),
            ..pc()
        };
        let a = spec.args();
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=/img/a,,b.raw,if=virtio,format=raw,snapshot=on",
                "file=/dev/vda,if=virtio,format=raw,cache=unsafe"
            ]
        );
        assert!(a
            .windows(2)
            .any(|w| w == ["-qmp", "unix:/run/q,,1.sock,server=on,wait=off"]));
        assert!(!pc().args().iter().any(|x| x == "-drive" || x == "-qmp"));
    }

    #[test]
    fn virtio_ports_are_two_consoles_on_one_device() {
        let spec = VmSpec {
            firmware_dir: None,
            vcpus: 1,
            append: kernel_cmdline_for(Ports::Virtio, "x=1"),
            proto: Chardev::Socket("/run/p.sock".into()),
            ports: Ports::Virtio,
            machine: Machine::Microvm,
            ..pc()
        };
        let a = spec.args();
        assert!(!a.contains(&"-serial".to_string()));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-machine" && w[1].starts_with("microvm,")));
        assert!(a
            .windows(2)
            .any(|w| w == ["-global", "virtio-mmio.ioeventfd=off"]));
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-serial-device,id=vser0,max_ports=1",
                "virtconsole,bus=vser0.0,chardev=console",
                "virtio-serial-device,id=vser1,max_ports=2",
                "virtserialport,bus=vser1.0,nr=1,chardev=proto,name=exitlab.proto"
            ]
        );
        assert!(spec
            .append
            .starts_with("console=hvc0 EXITLAB_PROTO=exitlab.proto "));
        let pc = VmSpec {
            machine: Machine::Pc,
            ..spec.clone()
        }
        .args();
        assert!(pc.windows(2).any(|w| w == ["-machine", "pc"]));
        assert!(!pc.iter().any(|x| x.contains("virtio-mmio")));
        assert!(pc
            .iter()
            .any(|x| x == "virtio-serial-pci,id=vser1,max_ports=2,ioeventfd=off"));
        let serial = VmSpec {
            ports: Ports::Serial,
            ..spec.clone()
        }
        .args();
        assert!(serial.windows(2).any(|w| w == ["-machine", "pc"]));
        assert!(!spec.append.contains("ttyS0"));
        assert!(kernel_cmdline("").starts_with("console=ttyS0 "));
    }

    #[test]
    fn cmdline_panics_reboot() {
        assert!(kernel_cmdline("x=1").contains("panic=-1"));
        assert!(kernel_cmdline("x=1").ends_with(" x=1"));
    }
}
