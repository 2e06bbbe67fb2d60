//! The report: the results file every run writes, and the summary.
//!
//! Schema `kvm-exit-lab/results/v2` (docs/results.md): an envelope every scenario shares
//! (scenario, ok, exit_code, kernel, accel, l1/l2, kvm_stats by checkpoint, checks, notes,
//! timings, logs) and a body of the scenario's own under its name (`lab:`, `stress:`,
//! `exec:`, `selftest:`, `host_recipe:`). v1 had the bodies' fields at the top level,
//! empty or absent where a scenario had none.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{VmStats, STAT_EXITS, STAT_EXIT_CYCLES};
use serde::Serialize;

use crate::boot::RunLogs;
use crate::kernel::BuildInfo;
use crate::verify::{Check, StressFigures};

pub const SCHEMA: &str = "kvm-exit-lab/results/v2";

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
    pub kvm_stats: BTreeMap<String, StatsReport>,
    pub checks: Vec<Check>,
    /// Things worth knowing that are not failures (e.g. more threads than vCPUs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub timings: Timings,
    pub logs: RunLogs,
    /// What only this scenario reports, under the scenario's name.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
}

/// A scenario's own part of its results.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// `labctl lab`: test_assignment2's two readings.
    Lab { readings: Vec<ExitStats> },
    /// `labctl host-recipe`: test_assignment2's two readings, on Debian's kernel with the
    /// recipe's modules.
    HostRecipe { readings: Vec<ExitStats> },
    /// `labctl stress` (one boot of a sweep): the stress program's own readings before
    /// and after its CPUIDs, and the run's figures (None if it did not report).
    Stress {
        readings: Vec<ExitStats>,
        figures: Option<StressFigures>,
    },
    /// `labctl exec`: the command and how it ended, as `exit code N` or `killed by
    /// signal N` (None: it could not be started); the envelope's `exit_code` is the
    /// shell's reading of it.
    Exec {
        argv: Vec<String>,
        status: Option<String>,
    },
    /// `labctl selftest`: the TAP plan and the cases by outcome.
    Selftest {
        planned: Option<usize>,
        passed: usize,
        failed: Vec<String>,
        skipped: Vec<String>,
    },
}

impl Body {
    /// The leaf's readings the body holds, in order (none for most).
    pub fn readings(&self) -> &[ExitStats] {
        match self {
            Body::Lab { readings }
            | Body::HostRecipe { readings }
            | Body::Stress { readings, .. } => readings,
            Body::Exec { .. } | Body::Selftest { .. } => &[],
        }
    }
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
        let readings = self.body.as_ref().map_or(&[][..], Body::readings);
        for (i, r) in readings.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn results(body: Option<Body>) -> serde_yaml_ng::Value {
        let r = Results {
            schema: SCHEMA,
            scenario: "lab".into(),
            ok: true,
            exit_code: 0,
            kernel: None,
            accel: AccelReport {
                kind: "tcg".into(),
                cpu: "max".into(),
                reason: "test".into(),
            },
            l1: VmReport {
                vcpus: 1,
                memory_mib: 1024,
                kernel: None,
            },
            l2: None,
            kvm_stats: BTreeMap::new(),
            checks: vec![],
            notes: vec![],
            timings: Timings {
                build_s: None,
                image_s: 0.1,
                l1_up_s: None,
                l2_up_s: None,
                l2_done_s: None,
                total_s: 1.0,
            },
            logs: RunLogs::new(Path::new("/tmp/run")),
            body,
        };
        serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&r).unwrap()).unwrap()
    }

    #[test]
    fn a_body_sits_under_its_scenarios_name_and_none_adds_nothing() {
        let y = results(Some(Body::Lab {
            readings: vec![ExitStats {
                exits: 3,
                cycles: 4,
            }],
        }));
        assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/results/v2"));
        assert_eq!(y["lab"]["readings"][0]["exits"].as_u64(), Some(3));
        assert!(y.get("readings").is_none(), "v1's top-level field is gone");
        let y = results(Some(Body::Exec {
            argv: vec!["true".into()],
            status: Some(exitlab_proto::msg::Status::Code(0).to_string()),
        }));
        assert_eq!(y["exec"]["argv"][0].as_str(), Some("true"));
        assert!(y["exec"]["status"].as_str().unwrap().contains('0'));
        let y = results(Some(Body::HostRecipe { readings: vec![] }));
        assert!(y["host_recipe"]["readings"].is_sequence());
        let bare = results(None);
        let keys: Vec<_> = bare
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "schema",
                "scenario",
                "ok",
                "exit_code",
                "kernel",
                "accel",
                "l1",
                "l2",
                "kvm_stats",
                "checks",
                "timings",
                "logs"
            ]
        );
    }
}
