//! `labctl bench turnaround`: where a student's edit-and-rerun loop spends its time.
//!
//! Runs the lab scenario N times in this process (everything built), takes each run's
//! step times from its results (`timings`) and the wall clock around it, and prints the
//! median, minimum and maximum of each step; then a rebuild after touching
//! `arch/x86/kvm/x86.c` followed by the lab, `stress --vcpus 4` M times and, with
//! `--cold`, a cold build in a scratch build directory. Each figure is checked against
//! the goal docs/measurements.md states.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use exitlab_proto::leaf::LEAF;
use serde::Serialize;

use crate::cli::{CommonArgs, Global};
use crate::engine::Lab;
use crate::error::{code, setup};
use crate::kernel::KernelDirs;
use crate::progress::{self, fmt_elapsed};
use crate::report::Timings;
use crate::scenarios::lab::run_lab;
use crate::scenarios::soak::median;
use crate::scenarios::stress::{self, StressRequest};
use crate::verify::{self, Check};

#[derive(Args)]
pub struct TurnaroundArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// `labctl lab` runs (everything built).
    #[arg(long, value_name = "N", default_value = "10")]
    pub runs: u32,
    /// `labctl stress --vcpus 4` runs (0: none).
    #[arg(long, value_name = "M", default_value = "10")]
    pub stress_runs: u32,
    /// Also time a cold build in a scratch build directory (about 6 minutes on 2 cores).
    #[arg(long)]
    pub cold: bool,
}

impl TurnaroundArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        let req = TurnaroundRequest {
            runs: self.runs,
            stress_runs: self.stress_runs,
            cold: self.cold,
        };
        req.validate()?;
        turnaround(&g.lab(self.common.into())?, &req)
    }
}

/// The goals of issue 13 (docs/measurements.md, "Where labctl lab's time goes").
pub const GOAL_LAB_S: f64 = 7.0;
pub const GOAL_LAB_SPREAD: f64 = 1.5;
pub const GOAL_TOUCH_S: f64 = 20.0;
pub const GOAL_STRESS_S: f64 = 12.0;
pub const GOAL_COLD_S: f64 = 360.0;

/// CPUIDs per thread of the stress runs (the `labctl stress` default).
const STRESS_ITERATIONS: u64 = 10_000;
const STRESS_VCPUS: u32 = 4;
pub const MAX_RUNS: u32 = 1000;

pub struct TurnaroundRequest {
    /// `labctl lab` runs with everything built.
    pub runs: u32,
    /// `labctl stress --vcpus 4` runs (0: none).
    pub stress_runs: u32,
    /// Also time a cold build in a scratch build directory (6 minutes on 2 cores).
    pub cold: bool,
}

impl TurnaroundRequest {
    pub fn validate(&self) -> Result<()> {
        if self.runs == 0 || self.runs > MAX_RUNS {
            return Err(setup(format!(
                "--runs {}: give a number of lab runs from 1 to {MAX_RUNS}",
                self.runs
            )));
        }
        if self.stress_runs > MAX_RUNS {
            return Err(setup(format!(
                "--stress-runs {}: give a number from 0 to {MAX_RUNS}",
                self.stress_runs
            )));
        }
        Ok(())
    }
}

/// The steps of one `labctl lab` run, in seconds, in the order they happen.
pub const STEPS: [&str; 7] = [
    "build: checks, up-to-date test, images",
    "run image (cached L1 image + job)",
    "L1 boot, to its init's hello",
    "L2 boot: firmware, kernel, init",
    "L2 programs and checkpoints",
    "L2 and L1 power off, QEMU exits",
    "checks, results written",
];

#[derive(Debug, Clone, Serialize)]
pub struct LabRun {
    pub n: u32,
    pub ok: bool,
    pub wall_s: f64,
    /// One figure per [`STEPS`] entry; None if the run did not reach that step.
    pub steps: Vec<Option<f64>>,
    pub results: PathBuf,
}

/// Splits a run's wall time into [`STEPS`] from its timings (QEMU-relative instants).
pub fn steps_of(t: &Timings, wall_s: f64) -> Vec<Option<f64>> {
    let build = t.build_s;
    let boot_ends = t.total_s;
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let before_boot = build.unwrap_or(0.0) + t.image_s;
    vec![
        build,
        Some(t.image_s),
        t.l1_up_s,
        diff(t.l1_up_s, t.l2_up_s),
        diff(t.l2_up_s, t.l2_done_s),
        t.l2_done_s.map(|d| boot_ends - d),
        Some(wall_s - before_boot - boot_ends),
    ]
}

#[derive(Debug, Clone, Serialize)]
pub struct StepFigures {
    pub step: String,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
}

/// Median, minimum and maximum of each step over the runs that reached it.
pub fn figures(runs: &[LabRun]) -> Vec<StepFigures> {
    let mut rows: Vec<StepFigures> = STEPS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let xs: Vec<f64> = runs.iter().filter_map(|r| r.steps[i]).collect();
            row(name, &xs)
        })
        .collect();
    let walls: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
    rows.push(row("whole run, start to result", &walls));
    rows
}

fn row(name: &str, xs: &[f64]) -> StepFigures {
    StepFigures {
        step: name.into(),
        median_s: median(xs),
        min_s: xs.iter().copied().reduce(f64::min).unwrap_or(0.0),
        max_s: xs.iter().copied().fold(0.0, f64::max),
    }
}

#[derive(Serialize)]
struct TurnaroundFile<'a> {
    schema: &'static str,
    lab_runs: &'a [LabRun],
    steps: &'a [StepFigures],
    touch_and_lab_s: Option<f64>,
    stress_s: &'a [f64],
    cold_build_s: Option<f64>,
    checks: &'a [Check],
}

pub const SCHEMA: &str = "kvm-exit-lab/turnaround/v1";

/// `labctl bench turnaround`: 0 when every run passed and every goal is met, 1 if not.
/// `req` is validated by the caller, before the build directory is locked.
pub fn turnaround(lab: &Lab, req: &TurnaroundRequest) -> Result<i32> {
    let mut checks = Vec::new();
    // Everything built first, so the first timed run measures a rerun, not a build.
    lab.build()?;

    let mut runs = Vec::new();
    for n in 1..=req.runs {
        progress::note("turnaround", format!("labctl lab, run {n} of {}", req.runs));
        let run = timed_lab(lab, n)?;
        println!(
            "lab run {n:>3}/{}  {:<4} {:>7}  {}",
            req.runs,
            if run.ok { "ok" } else { "FAIL" },
            fmt_elapsed(Duration::from_secs_f64(run.wall_s)),
            run.results.display()
        );
        runs.push(run);
    }
    let steps = figures(&runs);
    print_steps(&steps);
    let failed = runs.iter().filter(|r| !r.ok).count();
    let whole = steps.last().expect("figures ends with the whole run");
    let spread = whole.max_s / whole.median_s.max(f64::MIN_POSITIVE);
    checks.push(Check::new(
        "lab-runs",
        failed == 0,
        format!("{} of {} lab runs passed", runs.len() - failed, runs.len()),
    ));
    checks.push(goal(
        "lab-median",
        whole.median_s,
        GOAL_LAB_S,
        &format!("labctl lab median over {} runs", runs.len()),
    ));
    checks.push(Check::new(
        "lab-spread",
        spread <= GOAL_LAB_SPREAD,
        format!("max/median {spread:.2} (goal <= {GOAL_LAB_SPREAD})"),
    ));

    // The edit-and-rerun loop: a KVM source file newer than the last build.
    let x86 = KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series)
        .src()
        .join("arch/x86/kvm/x86.c");
    let touch_s = if x86.is_file() {
        progress::note(
            "turnaround",
            format!("touching {} and running the lab", x86.display()),
        );
        touch(&x86)?;
        let t = Instant::now();
        let run = timed_lab(lab, 0)?;
        let s = t.elapsed().as_secs_f64();
        checks.push(Check::new(
            "touch-and-lab-ran",
            run.ok,
            format!("the lab after the rebuild: {}", run.results.display()),
        ));
        checks.push(goal(
            "touch-and-lab",
            s,
            GOAL_TOUCH_S,
            "rebuild after touching arch/x86/kvm/x86.c, then labctl lab",
        ));
        Some(s)
    } else {
        // A prebuilt kernel (--kernel) has no tree to touch: say so rather than skip.
        checks.push(Check::new(
            "touch-and-lab",
            false,
            format!(
                "{} does not exist: the lab runs a prebuilt kernel, so there is no rebuild to time; run without --kernel",
                x86.display()
            ),
        ));
        None
    };

    let mut stress = Vec::new();
    for n in 1..=req.stress_runs {
        progress::note(
            "turnaround",
            format!(
                "labctl stress --vcpus {STRESS_VCPUS}, run {n} of {}",
                req.stress_runs
            ),
        );
        let t = Instant::now();
        let code = stress::stress(
            lab,
            &StressRequest {
                sweep: vec![STRESS_VCPUS],
                threads: None,
                iterations: STRESS_ITERATIONS,
                leaf: LEAF,
                subleaf: 0,
            },
        )?;
        stress.push(t.elapsed().as_secs_f64());
        if code != 0 {
            checks.push(Check::new(
                "stress-runs",
                false,
                format!("stress run {n} ended with exit status {code}"),
            ));
        }
    }
    if !stress.is_empty() {
        let (med, max) = (median(&stress), stress.iter().copied().fold(0.0, f64::max));
        println!(
            "stress --vcpus {STRESS_VCPUS}: median {med:.1} s, max {max:.1} s over {} runs",
            stress.len()
        );
        checks.push(goal(
            "stress-median",
            med,
            GOAL_STRESS_S,
            &format!(
                "labctl stress --vcpus {STRESS_VCPUS} median over {} runs",
                stress.len()
            ),
        ));
    }

    let cold_s = if req.cold {
        let s = cold_build(lab)?;
        checks.push(goal(
            "cold-build",
            s,
            GOAL_COLD_S,
            "cold build in a scratch directory: unpack, patch, configure, kernel, selftest, guest programs, L1 image",
        ));
        Some(s)
    } else {
        None
    };

    verify::print_checks(&checks, 20);
    let path = lab.cfg.build_dir.join("bench/turnaround.yaml");
    std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
    let file = TurnaroundFile {
        schema: SCHEMA,
        lab_runs: &runs,
        steps: &steps,
        touch_and_lab_s: touch_s,
        stress_s: &stress,
        cold_build_s: cold_s,
        checks: &checks,
    };
    std::fs::write(&path, serde_yaml_ng::to_string(&file)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("figures: {}", path.display());
    Ok(code::of_checks(verify::all_ok(&checks)))
}

fn goal(name: &str, s: f64, goal_s: f64, what: &str) -> Check {
    Check::new(
        name,
        s <= goal_s,
        format!("{what}: {s:.1} s (goal <= {goal_s} s)"),
    )
}

/// One `labctl lab` run, quiet, with its step times.
fn timed_lab(lab: &Lab, n: u32) -> Result<LabRun> {
    let t = Instant::now();
    let (results, path) = run_lab(lab, |_| {})?;
    let wall_s = t.elapsed().as_secs_f64();
    Ok(LabRun {
        n,
        ok: results.ok,
        wall_s,
        steps: steps_of(&results.timings, wall_s),
        results: path,
    })
}

fn touch(path: &std::path::Path) -> Result<()> {
    let f = std::fs::File::options()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_modified(std::time::SystemTime::now())
        .with_context(|| format!("touching {}", path.display()))?;
    Ok(())
}

fn print_steps(steps: &[StepFigures]) {
    println!(
        "{:<42} {:>8} {:>8} {:>8}",
        "step of labctl lab", "median", "min", "max"
    );
    for s in steps {
        println!(
            "{:<42} {:>7.2}s {:>7.2}s {:>7.2}s",
            s.step, s.median_s, s.min_s, s.max_s
        );
    }
}

/// A cold build in a scratch build directory, removed afterwards.
fn cold_build(lab: &Lab) -> Result<f64> {
    let scratch = lab.cfg.build_dir.join("turnaround");
    let _ = std::fs::remove_dir_all(&scratch);
    let mut cold = lab.cfg.clone();
    cold.build_dir = scratch.clone();
    let cold_lab = lab.with_config(cold)?;
    progress::note(
        "turnaround",
        format!(
            "cold build in {} (6 minutes or so on 2 cores)",
            scratch.display()
        ),
    );
    let t = Instant::now();
    let built = cold_lab.build();
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&scratch);
    built?;
    println!("cold build: {}", fmt_elapsed(Duration::from_secs_f64(s)));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(l2_done: Option<f64>) -> Timings {
        Timings {
            build_s: Some(0.3),
            image_s: 0.1,
            l1_up_s: Some(2.0),
            l2_up_s: Some(5.5),
            l2_done_s: l2_done,
            total_s: 6.0,
        }
    }

    #[test]
    fn steps_add_up_to_the_wall_time() {
        let s = steps_of(&timings(Some(5.8)), 6.6);
        let got: Vec<f64> = s.iter().map(|x| x.unwrap()).collect();
        let want = [0.3, 0.1, 2.0, 3.5, 0.3, 0.2, 0.2];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
        assert!((got.iter().sum::<f64>() - 6.6).abs() < 1e-9);
    }

    #[test]
    fn a_run_cut_short_has_no_figure_for_the_steps_it_missed() {
        let s = steps_of(&timings(None), 7.0);
        assert_eq!(s[4], None);
        assert_eq!(s[5], None);
        assert!(s[6].is_some());
    }

    #[test]
    fn figures_take_median_min_max_per_step() {
        let run = |n, wall_s: f64| LabRun {
            n,
            ok: true,
            wall_s,
            steps: steps_of(&timings(Some(5.8)), wall_s),
            results: PathBuf::new(),
        };
        let f = figures(&[run(1, 6.6), run(2, 7.6), run(3, 6.8)]);
        assert_eq!(f.len(), STEPS.len() + 1);
        let whole = f.last().unwrap();
        assert_eq!((whole.median_s, whole.min_s, whole.max_s), (6.8, 6.6, 7.6));
        assert!((f[6].max_s - 1.2).abs() < 1e-9);
    }

    #[test]
    fn bad_counts_are_refused() {
        let r = |runs, stress_runs| TurnaroundRequest {
            runs,
            stress_runs,
            cold: false,
        };
        assert!(r(0, 0).validate().is_err());
        assert!(r(MAX_RUNS + 1, 0).validate().is_err());
        assert!(r(1, MAX_RUNS + 1).validate().is_err());
        assert!(r(10, 0).validate().is_ok());
    }
}
