//! `labctl soak`: one scenario run N times in a row, to measure how reliable the lab is.
//!
//! Each run is a child `labctl` with the scenario's own command line, so every run is
//! exactly what a user gets. The child names the run directories it creates in the file
//! `LABCTL_RUNS_FILE` points at; the soak reads each run's results and scans its consoles
//! for stalls (the same signs as the `no-stalls` check), then prints one line per run and
//! a summary with the failure and stall rates, also written as YAML.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use xshell::{cmd, Shell};

use crate::boot::{RunLogs, RUNS_FILE_ENV};
use crate::cli::Global;
use crate::error::{code, setup};
use crate::progress::fmt_elapsed;
use crate::verify;

/// Scenarios a soak may repeat: the ones that boot the lab and judge their own outcome.
pub const SOAKABLE: &[&str] = &["lab", "stress", "exec", "selftest", "record-boot"];

pub const SCHEMA: &str = "kvm-exit-lab/soak/v1";

/// `labctl soak`'s options.
#[derive(Args)]
pub struct SoakArgs {
    /// How many times to run the scenario.
    #[arg(long, value_name = "N", default_value = "10")]
    pub runs: u32,
    /// Where to write the summary (default: build/runs/soak-<scenario>-<pid>.yaml).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The scenario and its options, as you would type them after `labctl`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SCENARIO [OPTIONS]"
    )]
    pub command: Vec<String>,
}

impl SoakArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        let mut global = Vec::new();
        if let Some(c) = &g.config {
            global.extend(["--config".into(), c.display().to_string()]);
        }
        if let Some(r) = &g.repo {
            global.extend(["--repo".into(), r.display().to_string()]);
        }
        soak(
            &g.sh,
            &SoakRequest {
                runs: self.runs,
                command: self.command,
                global,
                out: self.out,
            },
        )
    }
}

/// What `labctl soak` was asked to do.
pub struct SoakRequest {
    pub runs: u32,
    /// The labctl command line to repeat, scenario first (`stress --vcpus 4`).
    pub command: Vec<String>,
    /// Global options to pass on (`--config`, `--repo`).
    pub global: Vec<String>,
    pub out: Option<PathBuf>,
}

pub const MAX_RUNS: u32 = 10_000;

impl SoakRequest {
    pub fn validate(&self) -> Result<()> {
        if self.runs == 0 || self.runs > MAX_RUNS {
            return Err(setup(format!(
                "--runs {}: give a number of runs from 1 to {MAX_RUNS}",
                self.runs
            )));
        }
        match self.command.first() {
            Some(s) if SOAKABLE.contains(&s.as_str()) => Ok(()),
            Some(s) => Err(setup(format!(
                "`{s}` cannot be soaked: give one of {} with its options, e.g. `labctl soak --runs 10 stress --vcpus 4`",
                SOAKABLE.join(", ")
            ))),
            None => Err(setup(format!(
                "give the scenario to repeat, one of {}, e.g. `labctl soak --runs 10 lab`",
                SOAKABLE.join(", ")
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakRun {
    pub n: u32,
    /// labctl's exit status (None: killed by a signal).
    pub status: Option<i32>,
    pub ok: bool,
    pub stalled: bool,
    /// The console lines that show a stall, with the VM they came from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stall_lines: Vec<String>,
    /// Start to result of the whole command.
    pub wall_s: f64,
    /// L2's `Hello`, from its run's results (the first boot's, for a sweep).
    pub l2_up_s: Option<f64>,
    pub run_dirs: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct SoakSummary {
    pub runs: u32,
    pub ok: u32,
    pub failed: u32,
    pub stalled: u32,
    pub failure_rate: f64,
    pub stall_rate: f64,
    pub median_s: f64,
    pub max_s: f64,
    /// max / median of the wall times.
    pub spread: f64,
}

#[derive(Serialize)]
struct SoakFile<'a> {
    schema: &'static str,
    command: String,
    summary: &'a SoakSummary,
    runs: &'a [SoakRun],
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn summarize(runs: &[SoakRun]) -> SoakSummary {
    let n = runs.len() as u32;
    let ok = runs.iter().filter(|r| r.ok && !r.stalled).count() as u32;
    let failed = runs.iter().filter(|r| !r.ok).count() as u32;
    let stalled = runs.iter().filter(|r| r.stalled).count() as u32;
    let times: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
    let med = median(&times);
    let max = times.iter().copied().fold(0.0, f64::max);
    let rate = |k: u32| {
        if n == 0 {
            0.0
        } else {
            f64::from(k) / f64::from(n)
        }
    };
    SoakSummary {
        runs: n,
        ok,
        failed,
        stalled,
        failure_rate: rate(failed),
        stall_rate: rate(stalled),
        median_s: med,
        max_s: max,
        spread: if med > 0.0 { max / med } else { 0.0 },
    }
}

/// The stall lines of one run directory's consoles.
fn stalls_in(dir: &Path) -> Vec<String> {
    let logs = RunLogs::new(dir);
    verify::stalls_in(&[("L1", &logs.l1_console), ("L2", &logs.l2_console)])
}

fn l2_up(dir: &Path) -> Option<f64> {
    let text = fs::read_to_string(dir.join("results.yaml")).ok()?;
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).ok()?;
    v.get("timings")?.get("l2_up_s")?.as_f64()
}

/// `labctl soak`: the scenario `req.runs` times; the exit status says whether every run
/// passed without a stall (0), a run failed or stalled (1), or a run could not start (2).
pub fn soak(sh: &Shell, req: &SoakRequest) -> Result<i32> {
    req.validate()?;
    let exe = std::env::current_exe().context("finding labctl's own executable")?;
    let shown = format!("labctl {}", req.command.join(" "));
    let scratch = tempdir()?;
    let mut runs: Vec<SoakRun> = Vec::new();
    let mut setup_failure = None;
    eprintln!("[soak] {} runs of `{shown}`", req.runs);
    for n in 1..=req.runs {
        let runs_file = scratch.join(format!("runs-{n}"));
        fs::write(&runs_file, "")?;
        let start = Instant::now();
        let (global, command) = (&req.global, &req.command);
        let out = {
            let _env = sh.push_env(RUNS_FILE_ENV, &runs_file);
            cmd!(sh, "{exe} {global...} {command...}")
                .ignore_status()
                .quiet()
                .output()
                .context("running labctl")?
        };
        let wall = start.elapsed();
        let run_dirs: Vec<PathBuf> = fs::read_to_string(&runs_file)
            .unwrap_or_default()
            .lines()
            .map(PathBuf::from)
            .collect();
        let status = out.status.code();
        let mut log = out.stdout.clone();
        log.extend_from_slice(&out.stderr);
        if let Some(first) = run_dirs.first() {
            let _ = fs::write(first.join("labctl-output.log"), &log);
        }
        let stall_lines: Vec<String> = run_dirs.iter().flat_map(|d| stalls_in(d)).collect();
        let run = SoakRun {
            n,
            status,
            ok: status == Some(0),
            stalled: !stall_lines.is_empty(),
            stall_lines,
            wall_s: wall.as_secs_f64(),
            l2_up_s: run_dirs.first().and_then(|d| l2_up(d)),
            run_dirs,
        };
        println!(
            "run {n:>4}/{}  {:<7} {:>7}  L2 up {:>6}  {}{}",
            req.runs,
            match (run.ok, run.stalled) {
                (true, false) => "ok".to_string(),
                (true, true) => "STALLED".to_string(),
                (false, _) => format!(
                    "FAIL {}",
                    status.map_or("signal".to_string(), |c| c.to_string())
                ),
            },
            fmt_elapsed(wall),
            run.l2_up_s.map_or("-".into(), |s| format!("{s:.1}s")),
            run.run_dirs
                .first()
                .map_or("(no run directory)".into(), |d| d.display().to_string()),
            if run.stalled {
                format!("\n      {}", run.stall_lines.join("\n      "))
            } else {
                String::new()
            }
        );
        let no_run = run.run_dirs.is_empty();
        let interrupted = status.is_none();
        runs.push(run);
        if no_run || interrupted || status == Some(code::SETUP.into()) {
            // Not flakiness: the command cannot run (bad options, a missing tool) or the
            // user stopped it. Repeating it would only repeat that.
            let text = String::from_utf8_lossy(&log);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            setup_failure = Some(format!(
                "run {n} {}; stopping the soak. Its last output:\n  {}",
                if interrupted {
                    "was interrupted".to_string()
                } else {
                    format!("could not run (exit status {})", status.unwrap_or_default())
                },
                tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
            ));
            break;
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    let summary = summarize(&runs);
    let path = match &req.out {
        Some(p) => p.clone(),
        None => runs
            .iter()
            .find_map(|r| r.run_dirs.first())
            .and_then(|d| d.parent())
            .unwrap_or(Path::new("."))
            .join(format!(
                "soak-{}-{}.yaml",
                req.command[0],
                std::process::id()
            )),
    };
    let file = SoakFile {
        schema: SCHEMA,
        command: shown.clone(),
        summary: &summary,
        runs: &runs,
    };
    fs::write(&path, serde_yaml_ng::to_string(&file)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "soak: {} runs of `{shown}`: {} ok, {} failed, {} stalled (failure rate {:.1} %, stall rate {:.1} %); time median {:.1} s, max {:.1} s, spread (max/median) {:.2}",
        summary.runs,
        summary.ok,
        summary.failed,
        summary.stalled,
        100.0 * summary.failure_rate,
        100.0 * summary.stall_rate,
        summary.median_s,
        summary.max_s,
        summary.spread
    );
    println!("summary: {}", path.display());
    if let Some(why) = setup_failure {
        eprintln!("[soak] {why}");
        return Ok(code::SETUP.into());
    }
    Ok(code::of_checks(summary.failed == 0 && summary.stalled == 0))
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("labctl-soak-{}", std::process::id()));
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32, ok: bool, stalled: bool, wall_s: f64) -> SoakRun {
        SoakRun {
            n,
            status: Some(if ok { 0 } else { 1 }),
            ok,
            stalled,
            stall_lines: vec![],
            wall_s,
            l2_up_s: None,
            run_dirs: vec![],
        }
    }

    #[test]
    fn summary_counts_failures_stalls_and_spread() {
        let s = summarize(&[
            run(1, true, false, 10.0),
            run(2, true, true, 30.0),
            run(3, false, false, 12.0),
            run(4, true, false, 11.0),
        ]);
        assert_eq!((s.runs, s.ok, s.failed, s.stalled), (4, 2, 1, 1));
        assert_eq!(s.median_s, 11.5);
        assert_eq!(s.max_s, 30.0);
        assert!((s.spread - 30.0 / 11.5).abs() < 1e-9);
        assert_eq!(s.stall_rate, 0.25);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn only_scenarios_can_be_soaked() {
        let req = |cmd: &[&str], runs| SoakRequest {
            runs,
            command: cmd.iter().map(|s| s.to_string()).collect(),
            global: vec![],
            out: None,
        };
        assert!(req(&["lab"], 3).validate().is_ok());
        assert!(req(&["stress", "--vcpus", "4"], 3).validate().is_ok());
        for (cmd, runs, says) in [
            (&["build"][..], 3, "cannot be soaked"),
            (&["soak"][..], 3, "cannot be soaked"),
            (&[][..], 3, "give the scenario"),
            (&["lab"][..], 0, "--runs 0"),
            (&["lab"][..], MAX_RUNS + 1, "from 1 to"),
        ] {
            let e = req(cmd, runs).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{cmd:?}: {e}");
        }
    }

    #[test]
    fn stalls_are_found_in_either_console() {
        let dir = std::env::temp_dir().join(format!("soak-stall-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("l1-console.log"), "fine\n").unwrap();
        fs::write(
            dir.join("l2-console.log"),
            "[ 12.3] rcu: rcu_sched kthread timer wakeup didn't happen for 6601 jiffies! g-1035 f0x0\nok\n",
        )
        .unwrap();
        let s = stalls_in(&dir);
        assert_eq!(s.len(), 1);
        assert!(
            s[0].starts_with("L2: ") && s[0].contains("6601 jiffies"),
            "{s:?}"
        );
        fs::write(dir.join("l2-console.log"), "all good\n").unwrap();
        assert!(stalls_in(&dir).is_empty());
        fs::remove_dir_all(dir).unwrap();
    }
}
