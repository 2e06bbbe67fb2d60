//! Progress of long work (kernel builds, boots) on stderr: a live line on a terminal,
//! a line every few seconds otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: &'static str,
    start: Instant,
    last: Instant,
    tty: bool,
    steps: u64,
}

impl Progress {
    pub fn new(label: &'static str) -> Self {
        let now = Instant::now();
        Self {
            label,
            start: now,
            last: now - Duration::from_secs(60),
            tty: std::io::stderr().is_terminal(),
            steps: 0,
        }
    }

    /// One unit of work done, described by `what` (e.g. a make output line).
    pub fn step(&mut self, what: &str) {
        self.steps += 1;
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(15)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let line = format!(
            "[{}] {:>5}  {:>6} steps  {}",
            self.label,
            fmt_elapsed(self.start.elapsed()),
            self.steps,
            what.trim()
        );
        if self.tty {
            let mut w: String = line.chars().take(110).collect();
            w.push_str("\x1b[K");
            eprint!("\r{w}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    pub fn done(&self, what: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!(
            "[{}] {what} ({})",
            self.label,
            fmt_elapsed(self.start.elapsed())
        );
    }
}

pub fn fmt_elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// A short status line on stderr.
pub fn note(label: &str, what: impl std::fmt::Display) {
    eprintln!("[{label}] {what}");
}

/// Runs `command` with its stdout and stderr appended to `log_path`, a progress line per
/// stdout line, and returns its exit status.
pub fn run_logged(
    mut command: std::process::Command,
    log_path: &std::path::Path,
    label: &'static str,
) -> anyhow::Result<std::process::ExitStatus> {
    use anyhow::Context;
    use std::io::BufRead;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // make cleans up after itself on SIGTERM (it deletes the targets it was writing).
    crate::lock::die_with_labctl(&mut command, libc::SIGTERM);
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log.try_clone()?))
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let mut p = Progress::new(label);
    let mut log_w = std::io::BufWriter::new(log);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            writeln!(log_w, "{line}")?;
            p.step(&line);
        }
    }
    let status = child.wait()?;
    log_w.flush()?;
    if status.success() {
        p.done("done");
    }
    Ok(status)
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
