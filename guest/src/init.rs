//! PID 1 of the lab's images, for both levels.
//!
//! Mounts the pseudo filesystems, reads `/lab/job.json`, runs its steps and reports over
//! the protocol port, then reboots, which QEMU (`-no-reboot`) turns into a clean exit.
//! In L1, a [`Step::Vm`] boots the L2 test VM on the patched KVM, relays its messages and
//! console upwards, and answers its checkpoints with the VM's KVM statistics
//! (`crate::l2`; a recording's sampler is `crate::sampler`).
//!
//! The sequence, in [`main`]: mount the pseudo filesystems, open the protocol port, say
//! `Hello`, run the job's steps in order (programs, checkpoints, kvm parameters, L2),
//! say `Done`, power off.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exitlab_proto::job::{Job, Level, Step, FILES_DIR, JOB_PATH};
use exitlab_proto::msg::{Msg, Status, Stream};
use exitlab_proto::vm::{self, CpuVirt};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::l2::run_vm;
use crate::port::{self, Sender};

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

pub(crate) fn to_status(s: ExitStatus) -> Status {
    match (s.code(), s.signal()) {
        (Some(c), _) => Status::Code(c),
        (None, Some(sig)) => Status::Signal(sig),
        (None, None) => Status::Code(-1),
    }
}
