//! `labctl bench scaling`: exits/s with 1, 2, 4 L2 vCPUs, accounting on and off.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::stress::{StressReport, StressSpec};
use serde::Serialize;

use crate::cli::{parse_count, vcpu_list, CommonArgs, Global, VcpuList};
use crate::engine::{self, Lab};
use crate::error::setup;
use crate::progress;

use super::measure::{set_accounting, Variant, PLAIN};

#[derive(Args)]
pub struct ScalingArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// L2 vCPU counts.
    #[arg(long, value_name = "N[,N...]", value_parser = vcpu_list, default_value = "1,2,4")]
    pub vcpus: VcpuList,
    /// CPUIDs per thread per run.
    #[arg(long, value_name = "K", default_value = "10000", value_parser = parse_count)]
    pub iterations: u64,
    /// Runs per vCPU count and accounting setting.
    #[arg(long, value_name = "R", default_value = "3")]
    pub repeats: u32,
}

impl ScalingArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        let lab = g.lab(self.common.into())?;
        scaling(&lab, &self.vcpus.0, self.iterations, self.repeats)
    }
}

/// `labctl bench scaling`: exits/s with 1, 2 and 4 L2 vCPUs, accounting on and off,
/// `repeats` runs each in one boot per vCPU count. Wall-clock under multi-threaded TCG:
/// noisy, so medians and spreads are reported.
pub fn scaling(lab: &Lab, sweep: &[u32], iterations: u64, repeats: u32) -> Result<i32> {
    if repeats == 0 || iterations == 0 || sweep.is_empty() {
        return Err(setup("--repeats, --iterations and --vcpus need at least 1"));
    }
    let p = lab.build()?;
    #[derive(Serialize)]
    struct Row {
        vcpus: u32,
        accounting: &'static str,
        exits_per_s: Vec<f64>,
        median: f64,
        spread_pct: f64,
    }
    let mut rows = Vec::new();
    let mut run_dirs = Vec::new();
    for &v in sweep {
        let mut cfg = lab.cfg.clone();
        cfg.l2_vcpus = v;
        let one = lab.with_config(cfg)?;
        let spec = StressSpec {
            threads: v,
            iterations,
            leaf: 0,
            subleaf: 0,
        };
        let mut steps = Vec::new();
        for on in [true, false] {
            steps.push(set_accounting(on));
            for _ in 0..repeats {
                steps.push(Step::Run { argv: spec.argv() });
            }
        }
        steps.push(set_accounting(true));
        progress::note(
            "bench",
            format!("scaling: {v} vCPU(s), {repeats} runs on and off"),
        );
        let job = engine::l2_vm(&one.cfg, vec![], steps);
        let run = one.run(&p, "bench-scaling", &job, &[], |_| {})?;
        run_dirs.push(run.dir.clone());
        let reports: Vec<StressReport> = run
            .programs(Level::L2)
            .iter()
            .filter_map(|pr| {
                pr.stdout
                    .lines()
                    .last()
                    .and_then(|l| StressReport::from_json(l).ok())
            })
            .collect();
        if reports.len() != 2 * repeats as usize {
            return Err(setup(format!(
                "scaling run with {v} vCPUs reported {} of {} measurements\n{}",
                reports.len(),
                2 * repeats,
                run.logs.describe()
            )));
        }
        for (i, accounting) in ["on", "off"].into_iter().enumerate() {
            let rates: Vec<f64> = reports[i * repeats as usize..(i + 1) * repeats as usize]
                .iter()
                .map(|r| u64::from(v) as f64 * iterations as f64 / (r.wall_ns as f64 / 1e9))
                .collect();
            let var = Variant::new(accounting, "patched", accounting, PLAIN, v, rates.clone());
            rows.push(Row {
                vcpus: v,
                accounting,
                exits_per_s: rates,
                median: var.median,
                spread_pct: var.spread_pct,
            });
        }
    }
    println!(
        "{:>5} {:<10} {:>12} {:>14} {:>8}",
        "vCPUs", "accounting", "exits/s", "exits/s/vCPU", "spread"
    );
    for r in &rows {
        println!(
            "{:>5} {:<10} {:>12.0} {:>14.0} {:>7.1}%",
            r.vcpus,
            r.accounting,
            r.median,
            r.median / f64::from(r.vcpus),
            r.spread_pct
        );
    }
    println!("(wall-clock rates of the nested lab under multi-threaded TCG: medians of {repeats} runs; noisy, compare on vs off within a row pair)");
    #[derive(Serialize)]
    struct Summary {
        schema: &'static str,
        iterations: u64,
        repeats: u32,
        rows: Vec<Row>,
        runs: Vec<PathBuf>,
    }
    let summary = Summary {
        schema: "kvm-exit-lab/bench-scaling/v1",
        iterations,
        repeats,
        rows,
        runs: run_dirs,
    };
    let path = engine::write_summary(lab, "bench-scaling", &summary)?;
    println!("results:  {}", path.display());
    Ok(0)
}
