//! `labctl bench exit-cost`: instructions per CPUID exit round trip under -icount,
//! accounting on, off and unpatched, and the leaves' query cost.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::leaf::{LEAF, LEAF_NATIVE, LEAF_SDM, NATIVE_OTHER, SDM_REASON_CPUID};
use exitlab_proto::stress::{StressReport, StressSpec};
use exitlab_proto::vm::Accel;
use serde::Serialize;

use crate::accel::AccelDecision;
use crate::cli::{check_baseline, parse_count, CommonArgs, Global};
use crate::engine::{self, Lab, Prepared};
use crate::error::{code, setup};
use crate::kernel::{self, KernelDirs, KernelInputs};
use crate::progress;

use super::measure::{set_accounting, Variant, PLAIN};
use crate::verify::Check;

#[derive(Args)]
pub struct ExitCostArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// CPUIDs per measurement.
    #[arg(long, value_name = "M", default_value = "20000", value_parser = parse_count)]
    pub count: u64,
    /// Measurements per variant (at least 2).
    #[arg(long, value_name = "R", default_value = "5")]
    pub repeats: u32,
    /// The unpatched bzImage to compare with (default: build it from the same source).
    #[arg(long, value_name = "BZIMAGE", conflicts_with = "no_baseline")]
    pub baseline: Option<PathBuf>,
    /// Skip the unpatched comparison.
    #[arg(long)]
    pub no_baseline: bool,
    /// vCPUs of the VM for the many-vCPU leaf query cost (0 skips it).
    #[arg(long, value_name = "N", default_value = "8")]
    pub wide_vcpus: u32,
    /// Measure the lab's own kernel configuration (no jump labels) instead of
    /// lab.config + CONFIG_JUMP_LABEL=y, the way distributions build kernels.
    #[arg(long)]
    pub lab_kernel: bool,
}

impl ExitCostArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        check_baseline(self.baseline.as_deref())?;
        let lab = g.lab(self.common.into())?;
        exit_cost(
            &lab,
            &ExitCostRequest {
                count: self.count,
                repeats: self.repeats,
                baseline: self.baseline,
                no_baseline: self.no_baseline,
                wide_vcpus: self.wide_vcpus,
                lab_kernel: self.lab_kernel,
            },
        )
    }
}

/// Goals the README states and `exit-cost` checks.
pub const GOAL_ON_PCT: f64 = 0.5;
pub const GOAL_OFF_PCT: f64 = 0.1;
pub const GOAL_SPREAD_PCT: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct ExitCostRequest {
    /// CPUIDs per measurement.
    pub count: u64,
    /// Measurements per variant.
    pub repeats: u32,
    /// The unpatched kernel: a file, or None to build it (unless `no_baseline`).
    pub baseline: Option<PathBuf>,
    pub no_baseline: bool,
    /// vCPUs of the VM for the "many vCPUs" query cost; 0 skips it.
    pub wide_vcpus: u32,
    /// Measure the lab's own kernel configuration (no jump labels) instead of the bench's.
    pub lab_kernel: bool,
}

/// What the bench adds to `kernel/lab.config` for the kernels it measures.
///
/// Distribution kernels have jump labels: a static key that is off costs a patched jump,
/// not a load, a test and a branch. The lab's kernel leaves them off only because runtime
/// code patching raced with multi-threaded TCG in L1 (`Oops: int3`); the bench runs L1
/// on one vCPU under single-threaded TCG, where that race cannot happen.
pub const BENCH_CONFIG: &str = "CONFIG_JUMP_LABEL=y";

/// The kernel configuration fragment of the bench's kernels, written next to them.
fn bench_fragment(lab: &Lab) -> Result<PathBuf> {
    let base = lab.repo.join("kernel/lab.config");
    let text = std::fs::read_to_string(&base)
        .map_err(|e| setup(format!("reading {}: {e}", base.display())))?;
    let dir = lab.cfg.build_dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("bench.config");
    let text = format!(
        "{text}\n# labctl bench: the kernels it measures are configured as distributions ship them\n{BENCH_CONFIG}\n"
    );
    if std::fs::read_to_string(&out).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&out, text)?;
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct ExitCostResults {
    pub schema: &'static str,
    pub ok: bool,
    pub count: u64,
    pub repeats: u32,
    pub kernel: Option<kernel::BuildInfo>,
    /// `lab` (kernel/lab.config) or `bench` (the same with CONFIG_JUMP_LABEL=y).
    pub kernel_config: &'static str,
    pub variants: Vec<Variant>,
    pub checks: Vec<Check>,
    pub run_dirs: Vec<PathBuf>,
}

fn icount() -> AccelDecision {
    AccelDecision {
        accel: Accel::TcgIcount,
        cpu: "max".into(),
        reason: "exit-cost counts instructions: single-threaded TCG with -icount shift=0,sleep=off"
            .into(),
    }
}

/// The stress program with one thread: M CPUIDs of `leaf`/`subleaf`, timed.
fn measure((leaf, subleaf): (u32, u32), count: u64) -> Step {
    Step::Run {
        argv: StressSpec {
            threads: 1,
            iterations: count,
            leaf,
            subleaf,
        }
        .argv(),
    }
}

/// The leaves whose query cost is measured: name, leaf, subleaf.
const QUERIES: [(&str, (u32, u32)); 3] = [
    ("query", (LEAF, 0)),
    ("query-sdm", (LEAF_SDM, SDM_REASON_CPUID)),
    ("query-native", (LEAF_NATIVE, NATIVE_OTHER)),
];

/// Boots L1 (`kernel`) with an L2 of `vcpus` running `steps`; returns instructions per
/// exit of every measurement, in order.
fn boot_and_measure(
    lab: &Lab,
    p: &Prepared,
    kernel: &Path,
    vcpus: u32,
    steps: Vec<Step>,
    count: u64,
    run_dirs: &mut Vec<PathBuf>,
) -> Result<Vec<f64>> {
    let mut cfg = lab.cfg.clone();
    cfg.l2_vcpus = vcpus;
    cfg.l1_vcpus_asked = Some(1);
    let one = lab.with_config(cfg)?;
    let prepared = Prepared {
        kernel: kernel.to_path_buf(),
        image: p.image.clone(),
        build: p.build.clone(),
        accel: icount(),
        qemu: p.qemu.clone(),
        l1_cmdline_base: p.l1_cmdline_base.clone(),
        built_in: None,
    };
    // One discarded run first: the freshly booted VM settles (deferred work, idle vCPUs
    // going tickless) before anything is measured.
    let warmup = steps
        .iter()
        .find(|s| matches!(s, Step::Run { .. }))
        .cloned();
    let steps: Vec<Step> = warmup.into_iter().chain(steps).collect();
    let expected = steps
        .iter()
        .filter(|s| matches!(s, Step::Run { .. }))
        .count();
    // The VM has `vcpus` vCPUs in KVM, which the leaf sums over, but L2 brings up only
    // one: an SMP guest cannot boot in reasonable time on one single-threaded,
    // instruction-counting L1 CPU, and the other vCPUs' activity would be counted too.
    let args = if vcpus > 1 { "maxcpus=1" } else { "" };
    let job = engine::l2_vm_with_args(&one.cfg, vec![], steps, args);
    let run = one.run(&prepared, "bench", &job, &[], |_| {})?;
    run_dirs.push(run.dir.clone());
    let programs = run.programs(Level::L2);
    let mut out = Vec::new();
    for pr in &programs {
        let report = pr
            .stdout
            .lines()
            .last()
            .and_then(|l| StressReport::from_json(l).ok())
            .ok_or_else(|| {
                setup(format!(
                    "a measurement in L2 did not report ({}): {}\n{}",
                    pr.status.map_or("no status".into(), |s| s.to_string()),
                    pr.stderr.trim(),
                    run.logs.describe()
                ))
            })?;
        let t = report.threads.first().map_or(0, |t| t.elapsed_ns);
        out.push(t as f64 / count as f64);
    }
    if out.len() == expected && run.done_ok(Level::L2) {
        out.remove(0);
    } else {
        return Err(setup(format!(
            "the benchmark VM ran {} of {expected} measurements: {}\n{}",
            out.len(),
            run.failures().join("; "),
            run.logs.describe()
        )));
    }
    Ok(out)
}

fn pct(a: f64, b: f64) -> f64 {
    (a / b - 1.0) * 100.0
}

pub fn exit_cost(lab: &Lab, req: &ExitCostRequest) -> Result<i32> {
    if req.count == 0 || req.repeats < 2 {
        return Err(setup(
            "--count must be at least 1 and --repeats at least 2 (determinism is checked between repeats)",
        ));
    }
    let p = lab.build()?;
    // The kernels measured: the lab's own, or the same series and source built with the
    // bench's configuration; the baseline is built with the same fragment.
    let sh: &xshell::Shell = &lab.sh;
    let (config_name, fragment, baseline_dir, patched, build_info) = if req.lab_kernel {
        (
            "lab",
            lab.repo.join("kernel/lab.config"),
            lab.cfg.build_dir.join("baseline"),
            p.kernel.clone(),
            p.build.clone(),
        )
    } else {
        let fragment = bench_fragment(lab)?;
        progress::note(
            "bench",
            format!("building the patched kernel with lab.config + {BENCH_CONFIG}"),
        );
        let dirs = KernelDirs::new(
            &lab.cfg.build_dir.join("bench/patched"),
            lab.cfg.kernel_series,
        );
        let info = kernel::build(
            sh,
            &dirs,
            &KernelInputs {
                series: lab.cfg.kernel_series,
                source: lab.cfg.kernel_src.as_deref(),
                patches: kernel::lab_kernel_patches(&lab.repo, lab.cfg.kernel_series)?,
                selftest: true,
                config_fragment: &fragment,
            },
        )?;
        (
            "bench",
            fragment,
            lab.cfg.build_dir.join("bench/baseline"),
            dirs.bzimage(),
            Some(info),
        )
    };
    let baseline = match (&req.baseline, req.no_baseline) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => None,
        (None, false) => {
            progress::note(
                "bench",
                "building the unpatched baseline kernel (same source and config)",
            );
            let dirs = KernelDirs::new(&baseline_dir, lab.cfg.kernel_series);
            kernel::build(
                sh,
                &dirs,
                &KernelInputs {
                    series: lab.cfg.kernel_series,
                    source: lab.cfg.kernel_src.as_deref(),
                    patches: kernel::baseline_patches(&lab.repo, lab.cfg.kernel_series)?,
                    selftest: false,
                    config_fragment: &fragment,
                },
            )?;
            Some(dirs.bzimage())
        }
    };
    let (m, r) = (req.count, req.repeats as usize);
    let mut run_dirs = Vec::new();
    let mut steps = Vec::new();
    for _ in 0..r {
        steps.push(measure(PLAIN, m));
    }
    steps.push(set_accounting(false));
    for _ in 0..r {
        steps.push(measure(PLAIN, m));
    }
    steps.push(set_accounting(true));
    for (_, q) in QUERIES {
        for _ in 0..r {
            steps.push(measure(q, m));
        }
    }
    progress::note(
        "bench",
        format!("patched kernel, 1 vCPU: {r} x {m} CPUIDs per variant"),
    );
    let a = boot_and_measure(lab, &p, &patched, 1, steps, m, &mut run_dirs)?;
    let mut variants = vec![
        Variant::new("on", "patched", "on", PLAIN, 1, a[..r].to_vec()),
        Variant::new("off", "patched", "off", PLAIN, 1, a[r..2 * r].to_vec()),
    ];
    for (i, (name, q)) in QUERIES.iter().enumerate() {
        let from = (2 + i) * r;
        variants.push(Variant::new(
            name,
            "patched",
            "on",
            *q,
            1,
            a[from..from + r].to_vec(),
        ));
    }
    if req.wide_vcpus > 0 {
        let v = req.wide_vcpus;
        let mut steps = Vec::new();
        for _ in 0..r {
            steps.push(measure(PLAIN, m));
        }
        for (_, q) in QUERIES {
            for _ in 0..r {
                steps.push(measure(q, m));
            }
        }
        progress::note("bench", format!("patched kernel, {v} vCPUs"));
        let b = boot_and_measure(lab, &p, &patched, v, steps, m, &mut run_dirs)?;
        variants.push(Variant::new(
            "on-wide",
            "patched",
            "on",
            PLAIN,
            v,
            b[..r].to_vec(),
        ));
        for (i, (name, q)) in QUERIES.iter().enumerate() {
            let from = (1 + i) * r;
            variants.push(Variant::new(
                &format!("{name}-wide"),
                "patched",
                "on",
                *q,
                v,
                b[from..from + r].to_vec(),
            ));
        }
    }
    if let Some(k) = &baseline {
        progress::note("bench", format!("unpatched kernel {}", k.display()));
        let steps = (0..r).map(|_| measure(PLAIN, m)).collect();
        let c = boot_and_measure(lab, &p, k, 1, steps, m, &mut run_dirs)?;
        variants.push(Variant::new("unpatched", "unpatched", "-", PLAIN, 1, c));
    }

    let checks = exit_cost_checks(&variants);
    let ok = checks.iter().all(|c| c.ok);
    println!(
        "kernels: {}",
        if req.lab_kernel {
            "the lab's configuration (kernel/lab.config: no jump labels)".to_string()
        } else {
            format!("kernel/lab.config + {BENCH_CONFIG}, patched and unpatched")
        }
    );
    print_exit_cost(&variants, &checks);
    let results = ExitCostResults {
        schema: "kvm-exit-lab/bench-exit-cost/v1",
        ok,
        count: m,
        repeats: req.repeats,
        kernel: build_info,
        kernel_config: config_name,
        variants,
        checks,
        run_dirs,
    };
    let path = engine::write_summary(lab, "bench-exit-cost", &results)?;
    println!("results:  {}", path.display());
    Ok(code::of_checks(ok))
}

/// The bench's goals, judged on the measured variants (by their lowest repeat, the
/// undisturbed one): each variant deterministic, accounting on within
/// [`GOAL_ON_PCT`] of off and of the unpatched kernel, off within [`GOAL_OFF_PCT`] of
/// the unpatched kernel (when one was measured).
pub fn exit_cost_checks(variants: &[Variant]) -> Vec<Check> {
    let get = |n: &str| variants.iter().find(|v| v.name == n).map(|v| v.min);
    let mut checks = Vec::new();
    for v in variants {
        checks.push(Check::new(
            &format!("deterministic-{}", v.name),
            v.agreement_pct <= GOAL_SPREAD_PCT,
            format!(
                "the two lowest repeats agree within {:.3}% (goal <= {GOAL_SPREAD_PCT}%); all within {:.3}%",
                v.agreement_pct, v.spread_pct
            ),
        ));
    }
    let (on, off) = (get("on").unwrap_or(0.0), get("off").unwrap_or(0.0));
    checks.push(Check::new(
        "on-vs-off",
        pct(on, off) <= GOAL_ON_PCT,
        format!(
            "accounting on costs {:+.3}% per exit vs off (goal <= {GOAL_ON_PCT}%)",
            pct(on, off)
        ),
    ));
    if let Some(base) = get("unpatched") {
        checks.push(Check::new(
            "on-vs-unpatched",
            pct(on, base) <= GOAL_ON_PCT,
            format!("{:+.3}% per exit (goal <= {GOAL_ON_PCT}%)", pct(on, base)),
        ));
        checks.push(Check::new(
            "off-vs-unpatched",
            pct(off, base) <= GOAL_OFF_PCT,
            format!("{:+.3}% per exit (goal <= {GOAL_OFF_PCT}%)", pct(off, base)),
        ));
    }
    checks
}

fn print_exit_cost(variants: &[Variant], checks: &[Check]) {
    println!(
        "{:<18} {:<10} {:<11} {:<21} {:>5} {:>12} {:>10} {:>10} {:>9}",
        "variant",
        "kernel",
        "accounting",
        "leaf",
        "vCPUs",
        "instr/exit",
        "median",
        "max",
        "agreement"
    );
    for v in variants {
        println!(
            "{:<18} {:<10} {:<11} {:<21} {:>5} {:>12.1} {:>10.1} {:>10.1} {:>8.3}%",
            v.name,
            v.kernel,
            v.accounting,
            v.leaf,
            v.l2_vcpus,
            v.min,
            v.median,
            v.max,
            v.agreement_pct
        );
    }
    println!("(instr/exit: the lowest repeat, since interference only adds; agreement: the two lowest repeats)");
    let get = |n: &str| variants.iter().find(|v| v.name == n);
    for (name, _) in QUERIES {
        for (query, plain) in [
            (name.to_string(), "on"),
            (format!("{name}-wide"), "on-wide"),
        ] {
            if let (Some(q), Some(p)) = (get(&query), get(plain)) {
                println!(
                    "{query:<18} leaf {} vs plain CPUID, {} vCPU(s): {:+.1} instructions ({:+.2}%)",
                    q.leaf,
                    q.l2_vcpus,
                    q.min - p.min,
                    pct(q.min, p.min)
                );
            }
        }
    }
    crate::verify::print_checks(checks, 24);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, samples: &[f64]) -> Variant {
        Variant::new(name, "k", "on", PLAIN, 1, samples.to_vec())
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn the_goals_are_judged_on_the_lowest_repeats() {
        // The measured figures: on +0.466 %, off +0.065 %, both within the goals; a
        // disturbed repeat (the 3400) does not count against determinism.
        let good = [
            variant("on", &[3268.9, 3269.0, 3400.0]),
            variant("off", &[3255.9, 3256.0]),
            variant("unpatched", &[3253.7, 3253.8]),
        ];
        let c = exit_cost_checks(&good);
        assert!(failed(&c).is_empty(), "{c:#?}");
        assert_eq!(c.len(), 3 + 3);
        // Accounting on 0.6 % above off and the unpatched kernel, off 0.15 % above it.
        let costly = [
            variant("on", &[3273.3, 3273.4]),
            variant("off", &[3258.6, 3258.7]),
            variant("unpatched", &[3253.7, 3253.8]),
        ];
        assert_eq!(
            failed(&exit_cost_checks(&costly)),
            ["on-vs-unpatched", "off-vs-unpatched"]
        );
        // Two lowest repeats 0.3 % apart: not a deterministic figure.
        let noisy = [
            variant("on", &[3260.0, 3270.0]),
            variant("off", &[3260.0, 3260.1]),
        ];
        assert_eq!(failed(&exit_cost_checks(&noisy)), ["deterministic-on"]);
    }
}
