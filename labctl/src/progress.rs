//! Progress of long work (kernel builds, boots) on stderr. On a terminal, an indicatif
//! bar with an ETA when the work's size is known (how many steps it took the last time it
//! completed), a spinner otherwise; without a terminal (CI logs, the tests), a plain line
//! every 15 seconds.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    label: &'static str,
    start: Instant,
    last: Instant,
    /// Some on a terminal.
    bar: Option<ProgressBar>,
    steps: u64,
}

impl Progress {
    pub fn new(label: &'static str) -> Self {
        Self::sized(label, None)
    }

    /// `total`: how many steps the same work took the last time, for a bar with an ETA.
    pub fn sized(label: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        let bar = std::io::stderr()
            .is_terminal()
            .then(|| terminal_bar(label, total));
        Self {
            label,
            start: now,
            last: now - Duration::from_secs(60),
            bar,
            steps: 0,
        }
    }

    /// One unit of work done, described by `what` (e.g. a make output line).
    pub fn step(&mut self, what: &str) {
        self.steps += 1;
        if let Some(b) = &self.bar {
            if b.length().is_some_and(|len| self.steps > len) {
                b.set_length(self.steps);
            }
            b.set_position(self.steps);
            b.set_message(what.trim().to_string());
            return;
        }
        if self.last.elapsed() < Duration::from_secs(15) {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "[{}] {:>5}  {:>6} steps  {}",
            self.label,
            fmt_elapsed(self.start.elapsed()),
            self.steps,
            what.trim()
        );
    }

    pub fn done(&self, what: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!(
            "[{}] {what} ({})",
            self.label,
            fmt_elapsed(self.start.elapsed())
        );
    }
}

impl Drop for Progress {
    /// Work that failed leaves no half-drawn bar above its error message.
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.finish_and_clear();
            }
        }
    }
}

fn terminal_bar(label: &'static str, total: Option<u64>) -> ProgressBar {
    let (bar, template) = match total {
        Some(n) if n > 0 => (
            ProgressBar::new(n),
            "[{prefix}] {elapsed:>4} [{bar:24}] {pos}/{len} steps, ETA {eta}  {wide_msg}",
        ),
        _ => (
            ProgressBar::new_spinner(),
            "[{prefix}] {spinner} {elapsed:>4} {pos} steps  {wide_msg}",
        ),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("the templates are valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(label);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
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

/// Where [`run_logged`] keeps how many steps its last successful run of `label` took
/// (one log can hold several kinds of work: the kernel, the headers, the selftest).
fn steps_file(log_path: &Path, label: &str) -> PathBuf {
    let mut p = log_path.as_os_str().to_owned();
    p.push(format!(".{label}.steps"));
    PathBuf::from(p)
}

/// Runs `command` with its stdout and stderr appended to `log_path`, a progress step per
/// stdout line, and returns its exit status. A successful run records its number of
/// steps next to the log, which sizes the next run's bar.
pub fn run_logged(
    mut command: std::process::Command,
    log_path: &Path,
    label: &'static str,
) -> anyhow::Result<std::process::ExitStatus> {
    use anyhow::Context;
    use std::io::{BufRead, Write};
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // make cleans up after itself on SIGTERM (it deletes the targets it was writing).
    crate::process::die_with_labctl(&mut command, libc::SIGTERM);
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log.try_clone()?))
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let total = std::fs::read_to_string(steps_file(log_path, label))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let mut p = Progress::sized(label, total);
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
        let _ = std::fs::write(steps_file(log_path, label), p.steps.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successful_run_records_its_steps_for_the_next_bar() {
        let dir = std::env::temp_dir().join(format!("progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("build.log");
        assert_eq!(
            steps_file(&log, "kernel"),
            dir.join("build.log.kernel.steps")
        );
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo one; echo two; echo three >&2"]);
        assert!(run_logged(c, &log, "test").unwrap().success());
        assert_eq!(
            std::fs::read_to_string(steps_file(&log, "test")).unwrap(),
            "2"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("one\n") && text.contains("three\n"), "{text}");
        // A failed run leaves the last successful count alone.
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo a; echo b; echo c; exit 3"]);
        assert!(!run_logged(c, &log, "test").unwrap().success());
        assert_eq!(
            std::fs::read_to_string(steps_file(&log, "test")).unwrap(),
            "2"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
