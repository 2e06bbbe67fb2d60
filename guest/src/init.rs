//! PID 1 of the lab's images, for both levels.
//!
//! Mounts the pseudo filesystems, reads `/lab/job.json`, runs its steps and reports over
//! the protocol port, then reboots, which QEMU (`-no-reboot`) turns into a clean exit.
//! In L1, a [`Step::Vm`] boots the L2 test VM on the patched KVM, relays its messages and
//! console upwards, and answers its checkpoints with the VM's KVM statistics.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exitlab_proto::cpio::CpioWriter;
use exitlab_proto::job::{Job, Level, Step, VmJob, FILES_DIR, JOB_PATH};
use exitlab_proto::msg::{
    reason_updates, sample_values, Msg, ReasonTotals, Status, Stream, SAMPLED_STATS, STAT_EXITS,
};
use exitlab_proto::vm::{self, Accel, Chardev, CpuVirt, Ports, VmSpec};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::kvmstats::{self, VmStatsReader};
use crate::port::{self, Sender};

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

/// Entry point of the init binary. Never returns.
pub fn main() -> ! {
    let level = level_from_cmdline();
    let result = mount_pseudo_filesystems()
        .and_then(|()| port::open_tty(&proto_port()?))
        .and_then(|(tty, reader)| Ok((tty.try_clone()?, tty, reader)));
    match result {
        Ok((writer, tty, reader)) => {
            let tx = Sender::new(Box::new(writer));
            let mut reader = BufReader::new(reader);
            let ok = match run(level, &tx, &mut reader) {
                Ok(ok) => ok,
                Err(e) => {
                    tx.send(&Msg::Failed {
                        level,
                        error: format!("{e:#}"),
                    });
                    false
                }
            };
            tx.send(&Msg::Done { level, ok });
            port::drain(&tty, &mut reader);
        }
        Err(e) => eprintln!("exitlab init: {e:#}"),
    }
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // Not reached; if it were, returning from PID 1 panics the kernel, which the host sees.
    std::process::exit(1)
}

/// The protocol port: [`vm::PROTO_TTY`], or the virtio serial port the command line
/// names ([`vm::PROTO_ENV`]), found by its name under /sys/class/virtio-ports. A port of
/// a multiport device is added after the device probes, possibly after init started,
/// so it is waited for.
fn proto_port() -> Result<String> {
    let Ok(name) = std::env::var(vm::PROTO_ENV) else {
        return Ok(vm::PROTO_TTY.to_string());
    };
    let start = Instant::now();
    loop {
        if let Some(dev) = virtio_port_named(&name) {
            let path = format!("/dev/{dev}");
            if Path::new(&path).exists() {
                return Ok(path);
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the virtio serial port {name:?} did not appear in 30 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The device (`vport1p1`) of the virtio serial port called `name`.
fn virtio_port_named(name: &str) -> Option<String> {
    fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn level_from_cmdline() -> Level {
    // /proc is not mounted yet; the kernel passes unknown `KEY=value` parameters to init's
    // environment instead.
    match std::env::var("EXITLAB_LEVEL").as_deref() {
        Ok("l2") => Level::L2,
        _ => Level::L1,
    }
}

fn mount_pseudo_filesystems() -> Result<()> {
    let mounts: [(&str, &str, &str); 6] = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("debugfs", "/sys/kernel/debug", "debugfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (src, target, fstype) in mounts {
        fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
        mount(
            Some(src),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting {fstype} on {target}"))?;
    }
    Ok(())
}

/// The `Hello` a VM sends when its init (or, in a foreign guest, `boot-done`) is up.
pub fn hello(level: Level) -> Msg {
    let kernel = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {}",
                u.release().to_string_lossy(),
                u.version().to_string_lossy()
            )
        })
        .unwrap_or_default();
    let CpuVirt { vmx, svm } = CpuVirt::probe();
    Msg::Hello {
        level,
        kernel,
        cpus: thread::available_parallelism().map_or(1, |n| n.get() as u32),
        svm,
        vmx,
    }
}

fn run(level: Level, tx: &Sender, reader: &mut BufReader<File>) -> Result<bool> {
    tx.send(&hello(level));
    let text = fs::read_to_string(Path::new("/").join(JOB_PATH))
        .with_context(|| format!("reading /{JOB_PATH}"))?;
    let job = Job::parse(&text, level).context("the job in the image")?;
    for step in &job.steps {
        let ok = match step {
            Step::Run { argv } => run_program(level, argv, tx)?,
            Step::Test { argv } => {
                run_program(level, argv, tx)?;
                true
            }
            Step::Write { path, value } => {
                fs::write(path, value).with_context(|| format!("writing {value:?} to {path}"))?;
                true
            }
            Step::Checkpoint { tag } => {
                port::request(tx, reader, &Msg::Checkpoint { tag: tag.clone() })?;
                true
            }
            Step::SetKvmParam { name, value } => {
                port::request(
                    tx,
                    reader,
                    &Msg::SetKvmParam {
                        name: name.clone(),
                        value: value.clone(),
                    },
                )?;
                true
            }
            Step::Idle { ms } => {
                thread::sleep(Duration::from_millis(*ms));
                true
            }
            Step::Vm(vm) => run_vm(vm, tx)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs a program with its output streamed as messages. Returns whether it succeeded.
fn run_program(level: Level, argv: &[String], tx: &Sender) -> Result<bool> {
    let dir = Path::new("/").join(FILES_DIR);
    fs::create_dir_all(&dir)?;
    // `./prog` means the job's file, whatever the platform's rule for relative paths is.
    let program = if argv[0].contains('/') && !argv[0].starts_with('/') {
        dir.join(&argv[0])
    } else {
        Path::new(&argv[0]).to_path_buf()
    };
    let mut child = Command::new(&program)
        .args(&argv[1..])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", argv[0]))?;
    let out = child
        .stdout
        .take()
        .map(|r| relay_output(level, Stream::Stdout, r, tx));
    let err = child
        .stderr
        .take()
        .map(|r| relay_output(level, Stream::Stderr, r, tx));
    let status = child.wait().context("waiting for the program")?;
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    let status = to_status(status);
    tx.send(&Msg::Exited {
        level,
        argv: argv.to_vec(),
        status,
    });
    Ok(status.success())
}

fn relay_output(
    level: Level,
    stream: Stream,
    mut r: impl Read + Send + 'static,
    tx: &Sender,
) -> thread::JoinHandle<()> {
    let tx = tx.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            tx.send(&Msg::Output {
                level,
                stream,
                text: String::from_utf8_lossy(&buf[..n]).into_owned(),
            });
        }
    })
}

fn to_status(s: ExitStatus) -> Status {
    match (s.code(), s.signal()) {
        (Some(c), _) => Status::Code(c),
        (None, Some(sig)) => Status::Signal(sig),
        (None, None) => Status::Code(-1),
    }
}

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
fn l2_spec(vm: &VmJob) -> Result<VmSpec> {
    let files = Path::new("/").join(FILES_DIR);
    // The lab's own L2 talks over virtio consoles, where a line is one exit, not one
    // per byte; a recorded boot keeps the UARTs, whose console shows the kernel's first
    // line (a phase boundary), as a user's guest has (and the Debian guest needs them).
    let ports = if vm.disk_boot.is_none() && vm.record.is_none() {
        Ports::Virtio
    } else {
        Ports::Serial
    };
    let (cpu, kernel, initrd, append, mut extra) = match &vm.disk_boot {
        None => {
            write_l2_initrd(vm)?;
            (
                L2_CPU,
                vm::l1::KERNEL.to_string(),
                L2_INITRD.to_string(),
                vm::kernel_cmdline_for(ports, &format!("EXITLAB_LEVEL=l2 {}", vm.kernel_args)),
                vec![],
            )
        }
        Some(d) => {
            if !Path::new(&d.disk).exists() {
                bail!(
                    "the L2 disk {} is not there (is L1 given the disk image?)",
                    d.disk
                );
            }
            (
                DISK_L2_CPU,
                files.join(&d.kernel).display().to_string(),
                files.join(&d.initrd).display().to_string(),
                d.cmdline.clone(),
                vec![
                    "-drive".to_string(),
                    format!(
                        "file={},if=virtio,format=raw,cache=unsafe",
                        vm::esc(&d.disk)
                    ),
                ],
            )
        }
    };
    extra.extend(["-qmp".into(), format!("unix:{L2_QMP},server=on,wait=off")]);
    Ok(VmSpec {
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
        extra,
    })
}

/// Microseconds since `start`: the clock of a recording.
fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// A recording's clock. Periodic samples and checkpoint samples come from two threads;
/// each takes its time and reads the counters under `lock`, so that the samples' order
/// in time is the order of the reads, and the series is monotonic in time.
#[derive(Clone)]
struct Clock {
    start: Instant,
    /// Taken for each sample.
    state: Arc<Mutex<ClockState>>,
}

#[derive(Default)]
struct ClockState {
    /// The statistics the VM had at its first sample.
    known: Option<Vec<String>>,
    /// The per-reason table as of the last sample (each sample carries what changed).
    reasons: ReasonTotals,
}

/// One reading: when, the [`SAMPLED_STATS`], and the reasons that changed since the last.
struct Reading {
    t_us: u64,
    stats: BTreeMap<String, u64>,
    reasons: Vec<[u64; 3]>,
}

impl Reading {
    fn msg(self, tag: Option<String>) -> Msg {
        Msg::Sample {
            t_us: self.t_us,
            tag,
            v: sample_values(&self.stats),
            r: self.reasons,
        }
    }
}

impl Clock {
    fn new(start: Instant) -> Self {
        Self {
            start,
            state: Arc::default(),
        }
    }

    /// The time, then the VM's sampled statistics (the exit count first), then its
    /// per-reason table: a per-reason sum is never below the exit count of its sample.
    ///
    /// The files are read one by one, and a sampling thread that is not the real-time
    /// sampler (a checkpoint's) can be preempted by L2's vCPUs between them: their exits
    /// would then be in the reasons but not in the exit count (8 of them once, at a phase
    /// boundary). So the exit count is read again after the reasons and the reading is
    /// retried while it moved, as a seqlock reader retries; what is left is one exit in
    /// flight per vCPU (counted by reason, not yet in `exits`).
    fn sample(&self, dir: &Path) -> Result<Reading, kvmstats::StatsError> {
        const TRIES: usize = 4;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut t_us, mut stats, mut reasons);
        let mut tries = 0;
        loop {
            tries += 1;
            t_us = micros(self.start);
            stats = kvmstats::read_some(dir, SAMPLED_STATS)?;
            reasons = kvmstats::read_reasons(dir);
            let again = kvmstats::read_some(dir, &[STAT_EXITS])?;
            if tries == TRIES || again.get(STAT_EXITS) == stats.get(STAT_EXITS) {
                break;
            }
        }
        // While KVM destroys the VM its files go one by one: a sample that lacks the exit
        // count, or any statistic the VM had before, is of a VM that is going away, not a
        // VM whose counters went back to zero.
        let names: Vec<String> = stats.keys().cloned().collect();
        let complete = match state.known.as_ref() {
            Some(first) => first.iter().all(|n| stats.contains_key(n)),
            None => stats.contains_key(STAT_EXITS),
        };
        let reasons_gone = reasons.is_none() && !state.reasons.is_empty();
        if !complete || reasons_gone {
            return Err(kvmstats::StatsError::VmGone);
        }
        state.known.get_or_insert(names);
        let reasons = reasons.unwrap_or_default();
        let updates = reason_updates(&state.reasons, &reasons);
        state.reasons = reasons;
        Ok(Reading {
            t_us,
            stats,
            reasons: updates,
        })
    }
}

/// Boots L2 on the patched KVM and relays it. Returns whether L2 reported success.
fn run_vm(vm: &VmJob, tx: &Sender) -> Result<bool> {
    let _ = fs::remove_file(L2_SOCKET);
    let listener = UnixListener::bind(L2_SOCKET).context("binding the L2 protocol socket")?;
    listener.set_nonblocking(true)?;
    let spec = l2_spec(vm)?;
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
                    "exitlab: L2's QEMU did not exit within {QEMU_EXIT_AFTER_DONE:?} after L2 was done; killed it (README, Reliability)"
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

/// Makes the calling thread real-time (SCHED_FIFO, the lowest priority): the sampler
/// wakes for a few microseconds every interval and must not wait behind L2's vCPU threads,
/// which keep L1's CPUs busy (with L1 on one vCPU, 1 in 100 samples came late without it).
fn realtime_priority(tx: &Sender) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads `param`, which outlives the call; 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tx.send(&Msg::Output {
            level: Level::L1,
            stream: Stream::Stderr,
            text: format!(
                "warning: the sampler cannot run at real-time priority ({}); samples may come late\n",
                std::io::Error::last_os_error()
            ),
        });
    }
}

/// Samples the VM's statistics every `interval` (on a fixed schedule: a late sample does
/// not shift the ones after it) from when KVM creates the VM until it is destroyed.
fn sample(
    pid: i32,
    clock: Clock,
    interval: Duration,
    stop: &Arc<AtomicBool>,
    tx: &Sender,
) -> thread::JoinHandle<()> {
    let (stop, tx) = (stop.clone(), tx.clone());
    thread::spawn(move || {
        realtime_priority(&tx);
        let dir = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(d) = kvmstats::debugfs_dir(pid) {
                break d;
            }
            thread::sleep(Duration::from_millis(1));
        };
        let created = clock.start.elapsed();
        tx.send(&Msg::VmCreated {
            created_us: created.as_micros() as u64,
        });
        let mut tick = created;
        let mut last = (clock.start.elapsed(), local_timer_interrupts());
        while !stop.load(Ordering::Relaxed) {
            let Ok(reading) = clock.sample(&dir) else {
                return; // the VM is gone
            };
            tx.send(&reading.msg(None));
            let now = clock.start.elapsed();
            let loc = local_timer_interrupts();
            if now - last.0 > 5 * interval {
                tx.send(&Msg::Console {
                    level: Level::L1,
                    line: format!(
                        "exitlab: the sampler ran {} ms after its previous sample (every {} ms); \
                         L1 took {} local timer interrupts meanwhile",
                        (now - last.0).as_millis(),
                        interval.as_millis(),
                        loc.zip(last.1)
                            .map_or("an unknown number of".into(), |(a, b)| (a - b).to_string()),
                    ),
                    t_us: Some(now.as_micros() as u64),
                });
            }
            last = (now, loc);
            while tick <= now {
                tick += interval;
            }
            thread::sleep(tick - now);
        }
    })
}

/// L1's local APIC timer interrupts so far (`LOC` in /proc/interrupts, summed over CPUs).
/// A late sample with many of them says L1's timer fired and the sampler was not run; with
/// none, that the timer interrupt itself did not reach L1 (README, "Reliability").
fn local_timer_interrupts() -> Option<u64> {
    loc_interrupts(&fs::read_to_string("/proc/interrupts").ok()?)
}

fn loc_interrupts(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("LOC:"))?;
    line.split_whitespace()
        .skip(1)
        .map_while(|w| w.parse::<u64>().ok())
        .reduce(|a, b| a + b)
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
                // the socket for ever (README, "Reliability").
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

    #[test]
    fn local_timer_interrupts_are_summed_over_cpus() {
        let text = "           CPU0       CPU1\n  \
                    0:         40          0  IO-APIC   2-edge      timer\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    LOC:      12345        655   Local timer interrupts\n\
                    SPU:          0          0   Spurious interrupts\n";
        assert_eq!(loc_interrupts(text), Some(13000));
        assert_eq!(
            loc_interrupts("LOC:   7   Local timer interrupts\n"),
            Some(7)
        );
        assert_eq!(loc_interrupts("NMI: 0 Non-maskable interrupts\n"), None);
    }

    #[test]
    fn a_sample_of_a_vm_going_away_is_not_a_sample() {
        let dir = std::env::temp_dir().join(format!("clock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in SAMPLED_STATS {
            fs::write(dir.join(name), "7\n").unwrap();
        }
        fs::write(
            dir.join("exit_reasons"),
            "code sdm exits cycles\n0x72 10 5 100\n0x7b 30 2 40\n",
        )
        .unwrap();
        let clock = Clock::new(Instant::now());
        let first = clock.sample(&dir).unwrap();
        assert_eq!(first.stats.len(), SAMPLED_STATS.len());
        assert_eq!(first.reasons, vec![[10, 5, 100], [30, 2, 40]]);
        // The next sample carries only what changed.
        fs::write(
            dir.join("exit_reasons"),
            "code sdm exits cycles\n0x72 10 6 130\n0x7b 30 2 40\n",
        )
        .unwrap();
        assert_eq!(clock.sample(&dir).unwrap().reasons, vec![[10, 6, 130]]);
        // The per-reason file going is the VM going.
        fs::remove_file(dir.join("exit_reasons")).unwrap();
        assert!(matches!(
            clock.sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        fs::write(dir.join("exit_reasons"), "code sdm exits cycles\n").unwrap();
        // KVM removes the VM's files one by one: the exit count is still there, others not.
        fs::remove_file(dir.join(SAMPLED_STATS.last().unwrap())).unwrap();
        assert!(matches!(
            clock.sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        // A first sample needs the exit count.
        fs::remove_file(dir.join(STAT_EXITS)).unwrap();
        assert!(matches!(
            Clock::new(Instant::now()).sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
