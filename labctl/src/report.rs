//! Stage 7 of the pipeline, the report: the results file every run writes, and the summary.
//!
//! Schema `kvm-exit-lab/results/v1` (documented in README.md): scenario, ok, exit_code,
//! kernel (source, version, patch hashes), accel (kind, cpu, reason), l1/l2 (vCPUs,
//! memory, kernel), readings, kvm_stats by checkpoint, checks, timings, logs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{VmStats, STAT_EXITS, STAT_EXIT_CYCLES};
use serde::Serialize;

use crate::boot::RunLogs;
use crate::kernel::BuildInfo;
use crate::verify::{Check, StressFigures};

pub const SCHEMA: &str = "kvm-exit-lab/results/v1";

#[derive(Debug, Serialize)]
pub struct Results {
    pub schema: &'static str,
    pub scenario: String,
    pub ok: bool,
    pub exit_code: i32,
    pub kernel: Option<BuildInfo>,
    pub accel: AccelReport,
    pub l1: VmReport,
    pub l2: Option<VmReport>,
    pub readings: Vec<ExitStats>,
    pub kvm_stats: BTreeMap<String, StatsReport>,
    pub checks: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stress: Option<StressFigures>,
    /// Things worth knowing that are not failures (e.g. more threads than vCPUs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub timings: Timings,
    pub logs: RunLogs,
}

#[derive(Debug, Serialize)]
pub struct AccelReport {
    pub kind: String,
    pub cpu: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct VmReport {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `uname -r -v` as the VM reported it (None if it never came up).
    pub kernel: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Timings {
    /// `labctl build`'s part of the run: checks, the kernel's up-to-date test (or its
    /// build), images (None where the scenario did not build, e.g. a distribution kernel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_s: Option<f64>,
    /// Writing the run's initramfs (the cached L1 image plus the job).
    pub image_s: f64,
    /// From QEMU's start: L1's init said hello, L2's init said hello, L2's steps were
    /// done, QEMU exited.
    pub l1_up_s: Option<f64>,
    pub l2_up_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_done_s: Option<f64>,
    pub total_s: f64,
}

#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub exits: Option<u64>,
    pub exit_cycles: Option<u64>,
    pub per_vcpu: Vec<VcpuReport>,
}

#[derive(Debug, Serialize)]
pub struct VcpuReport {
    pub id: u32,
    pub exits: Option<u64>,
    pub exit_cycles: Option<u64>,
}

impl StatsReport {
    pub fn from(vm: &VmStats) -> Self {
        let cycles = vm.per_vcpu(STAT_EXIT_CYCLES);
        Self {
            exits: vm.total(STAT_EXITS),
            exit_cycles: vm.total(STAT_EXIT_CYCLES),
            per_vcpu: vm
                .per_vcpu(STAT_EXITS)
                .into_iter()
                .zip(cycles)
                .map(|((id, exits), (_, exit_cycles))| VcpuReport {
                    id,
                    exits,
                    exit_cycles,
                })
                .collect(),
        }
    }
}

impl Results {
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_yaml_ng::to_string(self)?)?;
        Ok(())
    }

    /// The human summary, on stdout.
    pub fn print_summary(&self, results_path: &Path) {
        if let Some(k) = &self.kernel {
            println!(
                "kernel:   Linux {} + {} patches, from {}",
                k.version,
                k.patches.len(),
                k.source
            );
        }
        println!(
            "accel:    {} (-cpu {}): {}",
            self.accel.kind, self.accel.cpu, self.accel.reason
        );
        let vm = |v: &VmReport| {
            format!(
                "{} vCPU{}, {} MiB{}",
                v.vcpus,
                if v.vcpus == 1 { "" } else { "s" },
                v.memory_mib,
                v.kernel
                    .as_deref()
                    .map(|k| format!(", Linux {k}"))
                    .unwrap_or_default()
            )
        };
        println!("L1:       {}", vm(&self.l1));
        if let Some(l2) = &self.l2 {
            println!("L2:       {}", vm(l2));
        }
        for (i, r) in self.readings.iter().enumerate() {
            println!("reading {}: exits={} cycles={}", i + 1, r.exits, r.cycles);
        }
        for c in &self.checks {
            c.print();
        }
        for n in &self.notes {
            println!("note:     {n}");
        }
        println!("results:  {}", results_path.display());
        if !self.ok {
            println!("logs:\n{}", self.logs.describe());
        }
    }
}
