//! L2, the test VM, as L1's init runs it: its image (this init, the guest programs, the
//! job and its files), its QEMU command line, and the relays of its protocol messages
//! and console up to labctl.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exitlab_proto::cpio::CpioWriter;
use exitlab_proto::job::{Level, VmJob, FILES_DIR};
use exitlab_proto::msg::Msg;
use exitlab_proto::vm::{self, Accel, Chardev, Disk, DiskWrites, Ports, VmSpec};

use crate::init::to_status;
use crate::kvmstats::{self, VmStatsReader};
use crate::port::Sender;
use crate::sampler::{micros, sample, Clock};

const L2_SOCKET: &str = "/run/l2-proto.sock";
const L2_QMP: &str = "/run/l2-qmp.sock";
/// L2's CPU: the host's (L1's) CPU without XSAVE and without SVM. Under TCG's emulated SVM,
/// the XSAVE state KVM exposes to L2 is inconsistent: L2 warned "XSAVE consistency problem"
/// on most boots, and some boots crashed L2 or reset L1. L2 needs no AVX; FXSAVE is enough.
/// L2 runs no VM either: with SVM, its own KVM would enable SVM on every vCPU at boot, a
/// third level of nesting that L1's KVM and TCG then emulate for nothing.
const L2_CPU: &str = "host,xsave=off,svm=off";
/// The CPU of a guest booted from a disk (a distribution kernel): without XSAVE, AVX state
/// cannot be enabled, so the AVX family goes too; Debian's kernel otherwise runs AVX code
/// (aesni_intel) and oopses on #UD. The lab's own L2 keeps `L2_CPU`: with these flags it
/// hung in early boot under `-icount` (seen at ACPI's PCI interrupt links, every time).
const DISK_L2_CPU: &str = "host,xsave=off,svm=off,avx=off,avx2=off,fma=off,f16c=off";
const L2_INITRD: &str = "/tmp/l2-initrd.cpio";
/// How long L2's QEMU gets to connect to the protocol socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the L2 image: this init, the guest programs, the L2 job and its files.
fn write_l2_initrd(vm: &VmJob) -> Result<()> {
    let out = File::create(L2_INITRD).with_context(|| format!("creating {L2_INITRD}"))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(out));
    w.file_from("init", 0o755, Path::new("/init"))?;
    for e in fs::read_dir(vm::l1::GUEST_BIN_DIR).context("listing the guest programs")? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        w.file_from(&format!("guest/{name}"), 0o755, &e.path())?;
    }
    let srcs: Vec<PathBuf> = vm
        .files
        .iter()
        .map(|name| Path::new("/").join(FILES_DIR).join(name))
        .collect();
    let files: Vec<(String, &Path)> = vm
        .files
        .iter()
        .cloned()
        .zip(srcs.iter().map(PathBuf::as_path))
        .collect();
    vm.job
        .write_into(&mut w, &files)
        .context("the L2 job and its files")?;
    w.finish()?.flush()?;
    Ok(())
}

/// The QEMU command line for L2: the lab's image, or a guest's own kernel and disk.
/// Prepares what L2 boots from: the lab's image, written now, or the guest's own disk,
/// which must be there.
fn prepare_l2(vm: &VmJob) -> Result<()> {
    match &vm.disk_boot {
        None => write_l2_initrd(vm),
        Some(d) if !Path::new(&d.disk).exists() => bail!(
            "the L2 disk {} is not there (is L1 given the disk image?)",
            d.disk
        ),
        Some(_) => Ok(()),
    }
}

/// L2's QEMU, from its job alone (what it boots from is prepared by [`prepare_l2`]).
fn l2_spec(vm: &VmJob) -> VmSpec {
    let files = Path::new("/").join(FILES_DIR);
    // The lab's own L2 talks over virtio consoles, where a line is one exit, not one
    // per byte; a recorded boot keeps the UARTs, whose console shows the kernel's first
    // line (a phase boundary), as a user's guest has (and the Debian guest needs them).
    let ports = if vm.disk_boot.is_none() && vm.record.is_none() {
        Ports::Virtio
    } else {
        Ports::Serial
    };
    let (cpu, kernel, initrd, append, disks) = match &vm.disk_boot {
        None => (
            L2_CPU,
            vm::l1::KERNEL.to_string(),
            L2_INITRD.to_string(),
            vm::kernel_cmdline_for(ports, &format!("EXITLAB_LEVEL=l2 {}", vm.kernel_args)),
            vec![],
        ),
        Some(d) => (
            DISK_L2_CPU,
            files.join(&d.kernel).display().to_string(),
            files.join(&d.initrd).display().to_string(),
            d.cmdline.clone(),
            vec![Disk {
                path: d.disk.clone(),
                writes: DiskWrites::Unflushed,
            }],
        ),
    };
    VmSpec {
        qemu: vm::l1::QEMU.into(),
        firmware_dir: Some(vm::l1::FIRMWARE_DIR.into()),
        accel: Accel::Kvm,
        cpu: cpu.into(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        kernel,
        initrd,
        append,
        console: Chardev::Stdio,
        proto: Chardev::Socket(L2_SOCKET.into()),
        ports,
        machine: vm.machine,
        disks,
        qmp: Some(L2_QMP.into()),
    }
}

/// Boots L2 on the patched KVM and relays it. Returns whether L2 reported success.
pub(crate) fn run_vm(vm: &VmJob, tx: &Sender) -> Result<bool> {
    let _ = fs::remove_file(L2_SOCKET);
    let listener = UnixListener::bind(L2_SOCKET).context("binding the L2 protocol socket")?;
    listener.set_nonblocking(true)?;
    prepare_l2(vm)?;
    let spec = l2_spec(vm);
    let start = Instant::now();
    let mut child = Command::new(&spec.qemu)
        .args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting QEMU for L2")?;
    let pid = child.id() as i32;
    let stop = Arc::new(AtomicBool::new(false));
    let clock = Clock::new(start);
    let sampler = vm.record.map(|r| {
        sample(
            pid,
            clock.clone(),
            Duration::from_millis(r.interval_ms.into()),
            &stop,
            tx,
        )
    });
    let relays: Vec<_> = [
        child.stdout.take().map(|r| relay_console(r, "", start, tx)),
        child
            .stderr
            .take()
            .map(|r| relay_console(r, "qemu: ", start, tx)),
    ]
    .into_iter()
    .flatten()
    .collect();

    let recording = vm.record.is_some().then_some(clock);
    let result = match accept(&listener, &mut child) {
        Ok(stream) => relay_l2(stream, pid, recording.clone(), tx),
        Err(e) => Err(e),
    };
    let result = match result {
        // Say whether L2's QEMU went first (and how) or is still there: the difference
        // between a crashed or killed QEMU and a protocol link that broke under it.
        Err(e) => Err(match exit_within(&mut child, QEMU_GRACE) {
            Some(status) => e.context(format!("L2's QEMU had exited ({status})")),
            None => {
                let _ = child.kill();
                e.context("L2's QEMU was still running; it was killed")
            }
        }),
        ok => ok,
    };
    let status = match (&result, exit_within(&mut child, QEMU_EXIT_AFTER_DONE)) {
        (_, Some(status)) => status,
        (Ok(_), None) => {
            // L2 finished and powered off, but its QEMU stays. Seen about once in seven
            // single-vCPU `-icount` L1s (the bench), with and without SVM in L2; not
            // root-caused. The run's data is complete: say so in L2's log and go on.
            tx.send(&Msg::Console {
                level: Level::L2,
                line: format!(
                    "exitlab: L2's QEMU did not exit within {QEMU_EXIT_AFTER_DONE:?} after L2 was done; killed it (docs/measurements.md, Reliability)"
                ),
                t_us: Some(micros(start)),
            });
            let _ = child.kill();
            child.wait().context("waiting for L2's QEMU")?
        }
        (Err(_), None) => child.wait().context("waiting for L2's QEMU")?,
    };
    let exited = micros(start);
    stop.store(true, Ordering::Relaxed);
    for r in relays {
        let _ = r.join();
    }
    if let Some(s) = sampler {
        let _ = s.join();
    }
    tx.send(&Msg::VmExited {
        status: to_status(status),
        t_us: recording.map(|_| exited),
    });
    result
}

/// How long L2's QEMU gets to exit by itself once its protocol link is gone.
const QEMU_GRACE: Duration = Duration::from_secs(2);
/// How long L2's QEMU gets to exit once L2 reported done (it takes well under a second).
const QEMU_EXIT_AFTER_DONE: Duration = Duration::from_secs(20);

/// The child's exit status if it exits within `grace`.
fn exit_within(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > grace {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn accept(listener: &UnixListener, child: &mut Child) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting L2's protocol connection"),
        }
        if let Some(status) = child.try_wait()? {
            bail!("L2's QEMU exited before connecting ({status}); see the L2 console");
        }
        if start.elapsed() > CONNECT_TIMEOUT {
            bail!("L2's QEMU did not connect within {CONNECT_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn relay_console(
    r: impl Read + Send + 'static,
    prefix: &'static str,
    start: Instant,
    tx: &Sender,
) -> thread::JoinHandle<()> {
    let tx = tx.clone();
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let t_us = micros(start);
            let text = String::from_utf8_lossy(&line);
            tx.send(&Msg::Console {
                level: Level::L2,
                line: format!("{prefix}{}", text.trim_end_matches(['\r', '\n'])),
                t_us: Some(t_us),
            });
            line.clear();
        }
    })
}

/// Relays L2's messages upwards until L2 is done, answering its checkpoints. While
/// recording (`recording` is the recording's start), each checkpoint is a sample too.
fn relay_l2(stream: UnixStream, pid: i32, recording: Option<Clock>, tx: &Sender) -> Result<bool> {
    let mut to_l2 = stream.try_clone()?;
    let mut stats = VmStatsReader::new(pid, Path::new(L2_QMP));
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)
            .context("reading L2's protocol socket")?
            == 0
        {
            bail!("L2 stopped reporting before it was done; see the L2 console");
        }
        let msg = match Msg::from_line(&line) {
            Ok(m) => m,
            Err(e) => {
                tx.send(&Msg::Console {
                    level: Level::L2,
                    line: format!(
                        "exitlab: unreadable protocol line ({e}): {}",
                        line.trim_end()
                    ),
                    t_us: recording.as_ref().map(|c| micros(c.start)),
                });
                continue;
            }
        };
        match msg {
            Msg::Checkpoint { tag } => {
                if let Some(clock) = &recording {
                    let reading = kvmstats::debugfs_dir(pid)
                        .and_then(|dir| clock.sample(&dir))
                        .context("sampling the L2 VM's KVM statistics")?;
                    tx.send(&reading.msg(Some(tag.clone())));
                }
                let vm = stats.read().context("reading the L2 VM's KVM statistics")?;
                tx.send(&Msg::KvmStats { tag, vm });
                to_l2.write_all(Msg::Resume.to_line().as_bytes())?;
            }
            Msg::SetKvmParam { name, value } => {
                let reply = match exitlab_proto::job::kvm_param_path(&name) {
                    None => Msg::Refused {
                        error: format!("{name:?} is not a parameter name"),
                    },
                    Some(path) => match fs::write(&path, &value) {
                        Ok(()) => {
                            tx.send(&Msg::Console {
                                level: Level::L1,
                                line: format!("exitlab: L2 asked for kvm.{name}={value}: set"),
                                t_us: recording.as_ref().map(|c| micros(c.start)),
                            });
                            Msg::Resume
                        }
                        Err(e) => Msg::Refused {
                            error: format!("writing {value:?} to {path}: {e}"),
                        },
                    },
                };
                to_l2.write_all(reply.to_line().as_bytes())?;
            }
            Msg::Hello { .. } => {
                // L2's init has opened its port. QEMU (7.2) starts reading the port's
                // chardev only when its main loop next runs, and with ioeventfd off the
                // open was handled on the vCPU thread, which does not wake the main loop:
                // without this, a reply sent before anything else woke it would sit in
                // the socket for ever (docs/measurements.md, "Reliability").
                stats
                    .wake()
                    .context("waking L2's QEMU after L2 opened its port")?;
                tx.send(&msg);
            }
            Msg::Done { ok, .. } => {
                if let Ok(vm) = stats.read() {
                    tx.send(&Msg::KvmStats {
                        tag: "done".into(),
                        vm,
                    });
                }
                tx.send(&msg);
                // L2 waits for this before it powers off when its port cannot tell it
                // that the host has taken the Done (a virtio serial port).
                let _ = to_l2.write_all(Msg::Resume.to_line().as_bytes());
                return Ok(ok);
            }
            other => tx.send(&other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exitlab_proto::job::{DiskBoot, Job, Recording, Step};
    use exitlab_proto::vm::Machine;

    fn job(disk_boot: Option<DiskBoot>, record: Option<Recording>) -> VmJob {
        VmJob {
            vcpus: 2,
            memory_mib: 256,
            files: vec![],
            kernel_args: "quiet".into(),
            machine: Machine::Microvm,
            job: Job {
                level: Level::L2,
                steps: vec![Step::Checkpoint { tag: "1".into() }],
            },
            disk_boot,
            record,
        }
    }

    #[test]
    fn the_labs_l2_is_a_virtio_microvm_on_its_own_image() {
        let s = l2_spec(&job(None, None));
        assert_eq!((s.ports, s.cpu.as_str()), (Ports::Virtio, L2_CPU));
        assert_eq!((s.vcpus, s.memory_mib), (2, 256));
        assert_eq!(s.initrd, L2_INITRD);
        assert_eq!(s.kernel, vm::l1::KERNEL);
        assert!(s.append.contains("EXITLAB_LEVEL=l2 quiet"), "{}", s.append);
        assert_eq!(s.accel, Accel::Kvm);
        assert_eq!(s.qmp.as_deref(), Some(L2_QMP));
        assert!(s.disks.is_empty());
    }

    #[test]
    fn a_recorded_boot_keeps_uarts_and_a_disk_boot_its_own_kernel() {
        let s = l2_spec(&job(None, Some(Recording { interval_ms: 20 })));
        assert_eq!(s.ports, Ports::Serial);
        let d = DiskBoot {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            disk: "/dev/vdb".into(),
            cmdline: "root=/dev/vda ro".into(),
        };
        let s = l2_spec(&job(Some(d), None));
        assert_eq!((s.ports, s.cpu.as_str()), (Ports::Serial, DISK_L2_CPU));
        assert_eq!(s.kernel, format!("/{FILES_DIR}/vmlinuz"));
        assert_eq!(s.initrd, format!("/{FILES_DIR}/initrd.img"));
        assert_eq!(s.append, "root=/dev/vda ro");
        assert_eq!(
            s.disks,
            [Disk {
                path: "/dev/vdb".into(),
                writes: DiskWrites::Unflushed,
            }]
        );
    }

    #[test]
    fn a_missing_disk_is_named_before_qemu_starts() {
        let d = DiskBoot {
            kernel: "k".into(),
            initrd: "i".into(),
            disk: "/nonexistent/disk.img".into(),
            cmdline: String::new(),
        };
        let e = prepare_l2(&job(Some(d), None)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/disk.img is not there"), "{e}");
    }
}
