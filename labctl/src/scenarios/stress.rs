//! `labctl stress`: threads pinned to L2's vCPUs execute CPUID, one boot per vCPU count
//! of the sweep; the guest's counters are checked against KVM's statistics.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::stress::{StressReport, StressSpec};
use serde::Serialize;

use crate::cli::{parse_count, parse_leaf, vcpu_list, CommonArgs, Global, LabArgs, VcpuList};
use crate::engine::{l2_vm, write_results, write_summary, Lab};
use crate::report::Body;
use crate::verify::{self, Check};

#[derive(Args)]
pub struct StressArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// L2 vCPUs; a list (1,2,4) runs a sweep, one boot per count, and prints a table.
    #[arg(long, value_name = "N[,N...]", value_parser = vcpu_list, default_value = "1")]
    pub vcpus: VcpuList,
    /// Threads, each pinned to its own vCPU (default: as many as vCPUs; more is allowed).
    #[arg(long, value_name = "T")]
    pub threads: Option<u32>,
    /// CPUIDs each thread executes.
    #[arg(long, value_name = "K", default_value = "10000", value_parser = parse_count)]
    pub iterations: u64,
    /// The CPUID leaf executed (EAX), decimal or 0x hex. Every leaf exits under KVM.
    #[arg(long, value_name = "L", default_value = "0", value_parser = parse_leaf)]
    pub leaf: u32,
    /// The CPUID subleaf (ECX).
    #[arg(long, value_name = "S", default_value = "0", value_parser = parse_leaf)]
    pub subleaf: u32,
}

impl StressArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        let lab = g.lab(LabArgs {
            common: self.common,
            vcpus: self.vcpus.0.first().copied(),
        })?;
        stress(
            &lab,
            &StressRequest {
                sweep: self.vcpus.0,
                threads: self.threads,
                iterations: self.iterations,
                leaf: self.leaf,
                subleaf: self.subleaf,
            },
        )
    }
}

/// What `labctl stress` was asked to do.
#[derive(Debug, Clone)]
pub struct StressRequest {
    /// L2 vCPU counts to run, one boot each.
    pub sweep: Vec<u32>,
    /// Threads per run; None: as many as vCPUs.
    pub threads: Option<u32>,
    pub iterations: u64,
    pub leaf: u32,
    pub subleaf: u32,
}

/// The most CPUIDs one stress run may execute (threads × iterations).
pub const MAX_STRESS_CPUIDS: u64 = 100_000_000;

impl StressRequest {
    pub fn validate(&self) -> Result<()> {
        if self.sweep.is_empty() {
            return Err(crate::error::setup(
                "--vcpus needs at least one count, e.g. 1,2,4",
            ));
        }
        if self.iterations == 0 {
            return Err(crate::error::setup(
                "--iterations 0 would execute no CPUID: give at least 1",
            ));
        }
        if self.threads == Some(0) {
            return Err(crate::error::setup("--threads must be at least 1"));
        }
        for v in &self.sweep {
            let t = u64::from(self.threads.unwrap_or(*v));
            if t.saturating_mul(self.iterations) > MAX_STRESS_CPUIDS {
                return Err(crate::error::setup(format!(
                    "{t} threads x {} iterations is more than the {MAX_STRESS_CPUIDS} CPUIDs a run may execute (each is a VM exit of ~35 us here)",
                    self.iterations
                )));
            }
        }
        Ok(())
    }
}

/// `labctl stress`: T threads pinned to L2's vCPUs execute CPUID K times each; the
/// counters are checked against KVM's statistics. One boot per vCPU count of the sweep.
pub fn stress(lab: &Lab, req: &StressRequest) -> Result<i32> {
    req.validate()?;
    let mut labs = Vec::new();
    for &v in &req.sweep {
        let mut cfg = lab.cfg.clone();
        cfg.l2_vcpus = v;
        labs.push(lab.with_config(cfg)?);
    }
    let p = lab.build()?;
    let mut rows = Vec::new();
    let mut exit_code = 0;
    for one in labs {
        let v = one.cfg.l2_vcpus;
        let spec = StressSpec {
            threads: req.threads.unwrap_or(v),
            iterations: req.iterations,
            leaf: req.leaf,
            subleaf: req.subleaf,
        };
        let mut notes = Vec::new();
        if spec.threads > v {
            notes.push(format!(
                "{} threads on {v} vCPUs: threads share vCPUs (thread i runs on vCPU i mod {v})",
                spec.threads
            ));
        }
        crate::progress::note(
            "stress",
            format!(
                "{v} vCPU(s), {} threads x {} CPUID({:#x})",
                spec.threads, spec.iterations, spec.leaf
            ),
        );
        let job = l2_vm(
            &one.cfg,
            vec![],
            vec![
                Step::Checkpoint {
                    tag: "before".into(),
                },
                Step::Run { argv: spec.argv() },
                Step::Checkpoint {
                    tag: "after".into(),
                },
            ],
        );
        let run = one.run(&p, "stress", &job, &[], |_| {})?;
        let prog = run.programs(Level::L2).pop();
        let report = prog
            .as_ref()
            .and_then(|pr| pr.stdout.lines().last())
            .and_then(|l| StressReport::from_json(l).ok());
        let stats = run.stats();
        let mut checks = vec![Check::new(
            "ran",
            report.is_some() && run.done_ok(Level::L2),
            match (&prog, &report) {
                (Some(_), Some(_)) => "the stress program ran and reported".to_string(),
                (Some(pr), None) => format!(
                    "the stress program ended with {} and no report: {}",
                    pr.status.map_or("no status".into(), |s| s.to_string()),
                    pr.stderr.trim()
                ),
                (None, _) => format!(
                    "the stress program did not run: {}",
                    run.failures().join("; ")
                ),
            },
        )];
        let mut figures = None;
        if let Some(rep) = &report {
            let (c, f) = verify::stress_checks(v, rep, stats.get("before"), stats.get("after"));
            checks.extend(c);
            figures = Some(f);
        }
        let mut results = one.results(&p, "stress", &run, checks);
        results.l2 = Some(one.l2_report(&run));
        results.body = Some(Body::Stress {
            readings: report.iter().flat_map(|r| [r.before, r.after]).collect(),
            figures: figures.clone(),
        });
        results.notes.extend(notes);
        let path = write_results(&results, &run)?;
        results.print_summary(&path);
        println!();
        // The worst of the boots: a crashed VM (126) over a failed check (1).
        exit_code = exit_code.max(results.exit_code);
        rows.push(StressRow {
            vcpus: v,
            ok: results.ok,
            figures,
            results: path,
        });
    }
    print_stress_table(&rows);
    let sweep = write_summary(
        lab,
        "stress-sweep",
        &StressSweep {
            schema: SWEEP_SCHEMA,
            rows: &rows,
        },
    )?;
    println!("sweep:    {}", sweep.display());
    Ok(exit_code)
}

/// `build/runs/stress-sweep-<pid>.yaml`: one row per boot of the sweep.
pub const SWEEP_SCHEMA: &str = "kvm-exit-lab/stress-sweep/v1";

#[derive(Serialize)]
struct StressSweep<'a> {
    schema: &'static str,
    rows: &'a [StressRow],
}

#[derive(Serialize)]
struct StressRow {
    vcpus: u32,
    ok: bool,
    figures: Option<verify::StressFigures>,
    /// That boot's results.yaml.
    results: PathBuf,
}

fn print_stress_table(rows: &[StressRow]) {
    println!(
        "{:>5} {:>7} {:>10} {:>10} {:>14} {:>12} {:>12}  checks",
        "vCPUs", "threads", "exits", "exits/s", "exits/s/vCPU", "cycles/exit", "excess"
    );
    for r in rows {
        let (v, ok) = (r.vcpus, r.ok);
        match &r.figures {
            Some(f) => println!(
                "{:>5} {:>7} {:>10} {:>10.0} {:>14.0} {:>12.0} {:>12}  {}",
                v,
                f.threads,
                f.exits,
                f.exits_per_s,
                f.exits_per_s_per_vcpu,
                f.cycles_per_exit,
                f.excess_exits,
                if ok { "ok" } else { "FAIL" }
            ),
            None => println!("{v:>5} {:>7} (no report)  FAIL", "-"),
        }
    }
}
