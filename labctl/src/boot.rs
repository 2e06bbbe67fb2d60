//! Stage 4 of the pipeline, the boot: starts L1 under QEMU, reads the typed messages L1
//! (and, relayed, L2) report, keeps every console as a log, and turns hangs, panics and
//! crashes into distinct errors that name the logs.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use exitlab_proto::job::Level;
use exitlab_proto::msg::Msg;
use exitlab_proto::vm::{self, kernel_cmdline, Chardev, Disk, VmSpec};
use xshell::{cmd, Shell};

use crate::accel::AccelDecision;
use crate::error::LabError;
use crate::progress::{self, fmt_elapsed};

/// The log files of one run, all in its run directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunLogs {
    pub dir: PathBuf,
    /// L1's serial console (written by QEMU).
    pub l1_console: PathBuf,
    /// L2's serial console, relayed by L1.
    pub l2_console: PathBuf,
    /// QEMU's own messages (stderr) for L1.
    pub qemu: PathBuf,
    /// Every protocol message, one JSON object per line.
    pub messages: PathBuf,
    /// L1's QMP socket (QEMU's monitor), for the state of a VM that hung.
    pub qmp: PathBuf,
    /// L1's vCPUs' registers, written when a boot times out.
    pub l1_registers: PathBuf,
}

impl RunLogs {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            l1_console: dir.join("l1-console.log"),
            l2_console: dir.join("l2-console.log"),
            qemu: dir.join("qemu-l1.log"),
            messages: dir.join("messages.jsonl"),
            qmp: dir.join("qmp-l1.sock"),
            l1_registers: dir.join("l1-registers.txt"),
        }
    }

    /// The paths, one per line, for error messages.
    pub fn describe(&self) -> String {
        [
            ("L1 console", &self.l1_console),
            ("L2 console", &self.l2_console),
            ("QEMU (L1)", &self.qemu),
            ("messages", &self.messages),
            ("L1 CPUs", &self.l1_registers),
        ]
        .iter()
        .filter(|(_, p)| *p != &self.l1_registers || p.exists())
        .map(|(what, p)| format!("  {what:<11} {}", p.display()))
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// L1's VM: `kernel` and `initrd` on `accel`, its console into `logs`' file, the message
/// stream on QEMU's stdout, QMP on `logs`' socket (for the registers of a hung L1).
pub struct L1Vm<'a> {
    pub qemu: &'a Path,
    pub accel: &'a AccelDecision,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// L1's kernel command line after the lab's base (ports, panic).
    pub cmdline: &'a str,
    pub disks: Vec<Disk>,
}

pub fn l1_vm(l1: L1Vm, logs: &RunLogs) -> VmSpec {
    VmSpec {
        qemu: l1.qemu.display().to_string(),
        firmware_dir: None,
        accel: l1.accel.accel,
        cpu: l1.accel.cpu.clone(),
        vcpus: l1.vcpus,
        memory_mib: l1.memory_mib,
        kernel: l1.kernel.display().to_string(),
        initrd: l1.initrd.display().to_string(),
        append: kernel_cmdline(l1.cmdline),
        console: Chardev::File(logs.l1_console.display().to_string()),
        proto: Chardev::Stdio,
        // L1 runs under TCG or on hardware: its port I/O costs little.
        ports: vm::Ports::Serial,
        machine: vm::Machine::Pc,
        disks: l1.disks,
        qmp: Some(logs.qmp.display().to_string()),
    }
}

/// What a boot produced: every message, in order, and when L1 and L2 came up.
#[derive(Debug)]
pub struct BootResult {
    pub msgs: Vec<Msg>,
    pub l1_up: Option<Duration>,
    pub l2_up: Option<Duration>,
    /// When L2's init reported its steps done (its programs have run).
    pub l2_done: Option<Duration>,
    pub total: Duration,
}

enum Event {
    Line(String),
    Eof,
}

/// The environment variable a child labctl appends its run directories to (`labctl soak`
/// sets it, [`new_run_dir`] appends to it).
pub const RUNS_FILE_ENV: &str = "LABCTL_RUNS_FILE";

const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// How long QEMU gets to exit after L1 reported done.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// The first panic line in a console log, if any.
pub fn find_panic(log: &Path) -> Option<String> {
    let text = fs::read(log).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .find(|l| l.contains(PANIC_MARKER))
        .map(|l| l.trim().to_string())
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a hung L1 and writes its vCPUs' registers (`info registers -a`) to `out`, through
/// QEMU's monitor: where L1 was when it stopped answering; with the functions of the RIPs
/// if the kernel was built here (its `vmlinux` next to `arch/x86/boot/bzImage`). Best
/// effort: a QEMU too far gone to answer within a few seconds leaves a note instead.
fn dump_l1_state(sh: &Shell, qmp: &Path, out: &Path, kernel: &Path) {
    fn ask(qmp: &Path) -> std::io::Result<String> {
        let s = std::os::unix::net::UnixStream::connect(qmp)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?; // the greeting
        let mut reply = |cmd: serde_json::Value| -> std::io::Result<serde_json::Value> {
            writeln!(w, "{cmd}")?;
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v.get("return").is_some() || v.get("error").is_some() {
                    return Ok(v);
                }
            }
        };
        reply(serde_json::json!({"execute": "qmp_capabilities"}))?;
        reply(serde_json::json!({"execute": "stop"}))?;
        let mut text = String::new();
        for hmp in ["info registers -a", "x/8i $pc"] {
            let v = reply(serde_json::json!({
                "execute": "human-monitor-command",
                "arguments": {"command-line": hmp}
            }))?;
            text += &format!(
                "(qemu) {hmp}\n{}\n",
                v["return"].as_str().unwrap_or_default()
            );
        }
        Ok(text)
    }
    let mut text = ask(qmp).unwrap_or_else(|e| format!("QEMU's monitor did not answer: {e}\n"));
    let vmlinux = kernel.ancestors().nth(4).map(|obj| obj.join("vmlinux"));
    let rips: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("RIP="))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if let (Some(v), false) = (vmlinux.filter(|v| v.is_file()), rips.is_empty()) {
        let addrs: Vec<String> = rips.iter().map(|r| format!("0x{r}")).collect();
        if let Ok(f) = cmd!(sh, "addr2line -f -i -e {v} {addrs...}").quiet().read() {
            text += &format!("RIPs in {}:\n{f}\n", v.display());
        }
    }
    let _ = fs::write(out, text);
}

/// Boots L1 as `vm` says, for at most `timeout`, calling `on_msg` for every message as it
/// arrives. `vm`'s console and QMP socket are `logs`' (see [`l1_vm`]).
pub fn boot(
    sh: &Shell,
    vm: &VmSpec,
    timeout: Duration,
    logs: &RunLogs,
    mut on_msg: impl FnMut(&Msg),
) -> Result<BootResult> {
    fs::create_dir_all(&logs.dir)?;
    File::create(&logs.l2_console)?;
    File::create(&logs.l1_console)?;
    let qemu = &vm.qemu;
    let args = vm.args();
    let mut command: std::process::Command = cmd!(sh, "{qemu} {args...}").into();
    // QEMU goes with labctl, whatever ends labctl (Ctrl-C, kill, a panic).
    crate::process::die_with_labctl(&mut command, libc::SIGKILL);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&logs.qemu)?))
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("QEMU's stdout")?;
    thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            if tx
                .send(Event::Line(String::from_utf8_lossy(&buf).into_owned()))
                .is_err()
            {
                return;
            }
            buf.clear();
        }
        let _ = tx.send(Event::Eof);
    });

    let start = Instant::now();
    let deadline = start + timeout;
    let mut messages = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&logs.messages)?;
    let mut l2_console = OpenOptions::new().append(true).open(&logs.l2_console)?;
    let mut result = BootResult {
        msgs: Vec::new(),
        l1_up: None,
        l2_up: None,
        l2_done: None,
        total: Duration::ZERO,
    };
    let mut l1_done = false;
    progress::note(
        "boot",
        format!(
            "starting L1 ({}, {} vCPU{}, {} MiB); console: {}",
            vm.accel.name().to_uppercase(),
            vm.vcpus,
            if vm.vcpus == 1 { "" } else { "s" },
            vm.memory_mib,
            logs.l1_console.display()
        ),
    );
    loop {
        let now = Instant::now();
        let limit = if l1_done {
            EXIT_GRACE
        } else if now >= deadline {
            Duration::ZERO
        } else {
            deadline - now
        };
        match rx.recv_timeout(limit) {
            Ok(Event::Line(line)) => {
                messages.write_all(line.as_bytes())?;
                let msg = match Msg::from_line(&line) {
                    Ok(m) => m,
                    // Noise before L1's init takes the port over is logged, not fatal.
                    Err(_) => continue,
                };
                match &msg {
                    Msg::Console {
                        level: Level::L2,
                        line,
                        ..
                    } => {
                        writeln!(l2_console, "{line}")?;
                    }
                    Msg::Hello { level, kernel, .. } => {
                        let t = start.elapsed();
                        match level {
                            Level::L1 => result.l1_up = Some(t),
                            Level::L2 => result.l2_up = Some(t),
                        }
                        progress::note(
                            "boot",
                            format!("{level} up after {}: Linux {kernel}", fmt_elapsed(t)),
                        );
                    }
                    Msg::Done {
                        level: Level::L1, ..
                    } => l1_done = true,
                    Msg::Done {
                        level: Level::L2, ..
                    } => result.l2_done = Some(start.elapsed()),
                    _ => {}
                }
                on_msg(&msg);
                result.msgs.push(msg);
            }
            Ok(Event::Eof) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !l1_done {
                    dump_l1_state(sh, &logs.qmp, &logs.l1_registers, Path::new(&vm.kernel));
                }
                kill(&mut child);
                let _ = fs::remove_file(&logs.qmp);
                if l1_done {
                    break;
                }
                let what = match (result.l1_up, result.l2_up) {
                    (None, _) => "L1 never came up",
                    (Some(_), None) => "L1 came up, but L2 never reported",
                    _ => "the scenario did not finish",
                };
                return Err(LabError::Timeout {
                    seconds: timeout.as_secs(),
                    what: what.into(),
                    logs: logs.describe(),
                }
                .into());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // QEMU closed its stdout: it is exiting. Give it the grace period, then make sure.
    let wait_start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if wait_start.elapsed() > EXIT_GRACE {
            kill(&mut child);
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    result.total = start.elapsed();
    let _ = fs::remove_file(&logs.qmp);
    l2_console.flush()?;
    for (level, log) in [(Level::L1, &logs.l1_console), (Level::L2, &logs.l2_console)] {
        if let Some(line) = find_panic(log) {
            return Err(LabError::Panic {
                level,
                line,
                logs: logs.describe(),
            }
            .into());
        }
    }
    if !l1_done {
        let how = match status {
            Some(s) => format!("QEMU exited ({s})"),
            None => "QEMU stopped talking and did not exit".into(),
        };
        let qemu_said = fs::read_to_string(&logs.qemu).unwrap_or_default();
        let qemu_said = qemu_said.trim();
        return Err(LabError::VmCrashed {
            what: format!(
                "{how} before L1 reported done{}",
                if qemu_said.is_empty() {
                    String::new()
                } else {
                    format!("; QEMU said: {qemu_said}")
                }
            ),
            logs: logs.describe(),
        }
        .into());
    }
    Ok(result)
}

/// A new run directory under `build/runs`, named by UTC time, scenario and pid.
pub fn new_run_dir(build_dir: &Path, scenario: &str) -> Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = build_dir.join("runs").join(format!(
        "{}-{scenario}-{}",
        utc_stamp(now),
        std::process::id()
    ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // `labctl soak` learns which runs its child made from this file.
    if let Some(list) = std::env::var_os(RUNS_FILE_ENV) {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&list)
            .with_context(|| format!("opening {}", Path::new(&list).display()))?;
        writeln!(f, "{}", dir.canonicalize().unwrap_or(dir.clone()).display())?;
    }
    Ok(dir)
}

/// `YYYYmmddTHHMMSSZ` for seconds since the epoch.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_795_392_000), "20261123T000000Z");
        assert_eq!(utc_stamp(951_782_400 + 3661), "20000229T010101Z");
    }

    #[test]
    fn finds_panics() {
        let dir = std::env::temp_dir().join(format!("panic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("c.log");
        fs::write(
            &log,
            "boot\n[    1.0] Kernel panic - not syncing: Attempted to kill init!\n",
        )
        .unwrap();
        assert!(find_panic(&log).unwrap().contains("Attempted to kill init"));
        fs::write(&log, "fine\n").unwrap();
        assert_eq!(find_panic(&log), None);
        fs::remove_dir_all(dir).unwrap();
    }
}
