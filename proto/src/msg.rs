//! Messages the lab's VMs report, one JSON object per line on the protocol serial port
//! (`ttyS1`). L2 writes to its ttyS1; L1 relays those upwards with its own on its ttyS1;
//! labctl reads them. The console (`ttyS0`) is for humans and logs only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::Level;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a program or VM ended: an exit code or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Code(i32),
    Signal(i32),
}

impl Status {
    pub fn success(&self) -> bool {
        *self == Status::Code(0)
    }

    /// The conventional shell exit status: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match *self {
            Status::Code(c) => c,
            Status::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Code(c) => write!(f, "exit code {c}"),
            Status::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// KVM's binary statistics (`KVM_GET_STATS_FD`) of one vCPU, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub id: u32,
    pub stats: BTreeMap<String, u64>,
}

/// KVM's statistics of one VM, read in L1 while the VM runs: first the VM-wide sums from
/// debugfs (`/sys/kernel/debug/kvm/<pid>-<fd>/`, which perturbs nothing), then each vCPU's
/// binary statistics through QEMU's `query-stats` (which briefly kicks each vCPU out of the
/// guest, so per-vCPU values can be a few exits ahead of the sums).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// VM-wide sums over all vCPUs, as debugfs reports them.
    pub vm: BTreeMap<String, u64>,
    pub vcpus: Vec<VcpuStats>,
}

impl VmStats {
    /// A VM-wide total: debugfs's sum if it has one, else the sum over the vCPUs; `None` if
    /// neither reports the statistic.
    pub fn total(&self, name: &str) -> Option<u64> {
        if let Some(v) = self.vm.get(name) {
            return Some(*v);
        }
        self.vcpu_sum(name)
    }

    /// Sum of one statistic over the per-vCPU readings.
    pub fn vcpu_sum(&self, name: &str) -> Option<u64> {
        let mut found = false;
        let mut sum = 0u64;
        for v in &self.vcpus {
            if let Some(x) = v.stats.get(name) {
                found = true;
                sum = sum.wrapping_add(*x);
            }
        }
        found.then_some(sum)
    }

    /// One statistic per vCPU, in vCPU id order.
    pub fn per_vcpu(&self, name: &str) -> Vec<(u32, Option<u64>)> {
        let mut v: Vec<_> = self
            .vcpus
            .iter()
            .map(|v| (v.id, v.stats.get(name).copied()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

/// Host-side name of the per-vCPU exit counter (upstream KVM).
pub const STAT_EXITS: &str = "exits";
/// Host-side name of the per-vCPU exit-cycles counter (added by kernel/6.12/patches).
pub const STAT_EXIT_CYCLES: &str = "exit_cycles";

/// The per-vCPU arrays of the patched KVM's binary statistics: exits and cycles per slot
/// (a vendor exit code). Debugfs shows only their first element.
pub const STAT_REASON_EXITS: &str = "exit_reason_exits";
pub const STAT_REASON_CYCLES: &str = "exit_reason_cycles";

/// Under what name a vCPU's [`VcpuStats`] carry the sum of a per-slot array: for every
/// vCPU not in the middle of an exit, the exits' sum is its `exits` and the cycles' its
/// `exit_cycles` (the series' invariant, with accounting on).
pub fn stat_slot_sum(array: &str) -> String {
    format!("{array}_sum")
}

/// The VM-wide exits of one SDM basic exit reason, as L1 reads them from the VM's debugfs
/// `exit_reasons` file (the patched KVM's per-reason counters summed over vCPUs and over
/// the vendor codes of that reason), carried in [`VmStats::vm`] under this name.
pub fn stat_sdm_reason_exits(reason: u32) -> String {
    format!("exit_reasons_sdm_{reason}")
}

/// What a recording samples: the totals, and KVM's counters of particular kinds of exit
/// and of exit-related work. The kinds overlap (an MMIO exit is also a page fault taken)
/// and do not cover every exit (CPUID, MSR and others have no counter of their own).
pub const SAMPLED_STATS: &[&str] = &[
    STAT_EXITS,
    STAT_EXIT_CYCLES,
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "signal_exits",
    "hypercalls",
    "insn_emulation",
    "pf_taken",
    "irq_injections",
];

/// A VM's exits and cycles by SDM basic exit reason.
pub type ReasonTotals = BTreeMap<u32, ReasonCount>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub exits: u64,
    pub cycles: u64,
}

/// What a sample carries of the per-reason table `now`, read after `before`: the reasons
/// whose counts changed (or are new), as `[reason, exits, cycles]`.
pub fn reason_updates(before: &ReasonTotals, now: &ReasonTotals) -> Vec<[u64; 3]> {
    now.iter()
        .filter(|(r, c)| before.get(r) != Some(c))
        .map(|(r, c)| [u64::from(*r), c.exits, c.cycles])
        .collect()
}

/// Applies a sample's per-reason updates (see [`Msg::Sample`]) to the table so far.
pub fn apply_reason_updates(table: &mut ReasonTotals, updates: &[[u64; 3]]) {
    for &[r, exits, cycles] in updates {
        if let Ok(r) = u32::try_from(r) {
            table.insert(r, ReasonCount { exits, cycles });
        }
    }
}

/// A sample's values in [`SAMPLED_STATS`] order, from a map of statistics.
pub fn sample_values(stats: &BTreeMap<String, u64>) -> Vec<Option<u64>> {
    SAMPLED_STATS
        .iter()
        .map(|n| stats.get(*n).copied())
        .collect()
}

/// A sample's values by name (missing statistics left out).
pub fn sample_stats(v: &[Option<u64>]) -> BTreeMap<String, u64> {
    SAMPLED_STATS
        .iter()
        .zip(v)
        .filter_map(|(n, x)| x.map(|x| (n.to_string(), x)))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// A VM's init is up.
    Hello {
        level: Level,
        kernel: String,
        cpus: u32,
        /// CPUID says the (virtual) CPU has AMD SVM / Intel VMX.
        svm: bool,
        vmx: bool,
    },
    /// Output of a program run by a [`Step::Run`](crate::job::Step::Run).
    Output {
        level: Level,
        stream: Stream,
        text: String,
    },
    /// A program run by a step ended.
    Exited {
        level: Level,
        argv: Vec<String>,
        status: Status,
    },
    /// A console line of the VM one level below, relayed by its parent. `t_us`: when the
    /// parent read it, in microseconds since it started the VM's QEMU (the clock of
    /// [`Msg::Sample`]).
    Console {
        level: Level,
        line: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        t_us: Option<u64>,
    },
    /// L1 → host, while recording (`VmJob::record`): the L2 VM's KVM statistics (debugfs
    /// sums over its vCPUs) at `t_us` microseconds since L1 started L2's QEMU. `tag` names
    /// the checkpoint the sample was taken for, if any; the others are periodic.
    ///
    /// `v` holds the [`SAMPLED_STATS`] in that order (`null`: this kernel lacks it), not a
    /// map: the protocol port carries about 16 KB/s, and a sample every 20 ms must leave
    /// room for the console lines relayed over the same port.
    ///
    /// `r` holds the VM's exits and cycles by SDM exit reason (the patched KVM's
    /// `exit_reasons` debugfs file summed by reason) as `[reason, exits, cycles]`, only for
    /// the reasons that changed since the sample read before this one: [`ReasonTotals`]
    /// rebuilds the whole table from the samples in time order.
    Sample {
        t_us: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        v: Vec<Option<u64>>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        r: Vec<[u64; 3]>,
    },
    /// L1 → host, while recording: the VM's statistics appeared (KVM created the VM) at
    /// `created_us` (on the clock of [`Msg::Sample`]).
    VmCreated { created_us: u64 },
    /// L2 → L1: report this VM's KVM statistics now; L2 waits for [`Msg::Resume`].
    Checkpoint { tag: String },
    /// L2 → L1: set a kvm module parameter (see `Step::SetKvmParam`); L2 waits.
    SetKvmParam { name: String, value: String },
    /// L1 → L2: the checkpoint was taken, or the parameter set.
    Resume,
    /// L1 → L2: the request could not be carried out.
    Refused { error: String },
    /// L1 → host: the statistics of the L2 VM at a checkpoint (or when it ended).
    KvmStats { tag: String, vm: VmStats },
    /// A step could not be carried out; the job stops.
    Failed { level: Level, error: String },
    /// L1 → host: the L2 VM's QEMU ended (`t_us`: when, on the clock of [`Msg::Sample`]).
    VmExited {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        t_us: Option<u64>,
    },
    /// All steps ran; `ok` is false if a step failed.
    Done { level: Level, ok: bool },
}

impl Msg {
    /// One line of JSON, with the trailing newline.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("messages always serialize");
        s.push('\n');
        s
    }

    pub fn from_line(line: &str) -> Result<Msg, serde_json::Error> {
        serde_json::from_str(line.trim_end_matches(['\r', '\n']))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_each_and_round_trips() {
        let msgs = [
            Msg::Output {
                level: Level::L2,
                stream: Stream::Stdout,
                text: "a\nb\n".into(),
            },
            Msg::Exited {
                level: Level::L2,
                argv: vec!["./x".into()],
                status: Status::Signal(9),
            },
            Msg::Console {
                level: Level::L2,
                line: "Linux version".into(),
                t_us: Some(12),
            },
            Msg::Sample {
                t_us: 50_000,
                tag: None,
                v: sample_values(&[("exits".to_string(), 5)].into()),
                r: vec![[10, 4, 1000]],
            },
            Msg::KvmStats {
                tag: "end".into(),
                vm: VmStats {
                    vm: [("exits".to_string(), 5)].into(),
                    vcpus: vec![VcpuStats {
                        id: 0,
                        stats: [("exits".to_string(), 5)].into(),
                    }],
                },
            },
        ];
        for m in msgs {
            let line = m.to_line();
            assert_eq!(line.matches('\n').count(), 1);
            assert_eq!(Msg::from_line(&line).unwrap(), m);
        }
    }

    #[test]
    fn totals_and_per_vcpu() {
        let mut vm = VmStats {
            vm: BTreeMap::new(),
            vcpus: vec![
                VcpuStats {
                    id: 1,
                    stats: [("exits".to_string(), 7)].into(),
                },
                VcpuStats {
                    id: 0,
                    stats: [("exits".to_string(), 5)].into(),
                },
            ],
        };
        assert_eq!(vm.total("exits"), Some(12));
        assert_eq!(vm.total("exit_cycles"), None);
        assert_eq!(vm.per_vcpu("exits"), vec![(0, Some(5)), (1, Some(7))]);
        vm.vm.insert("exits".into(), 11);
        assert_eq!(vm.total("exits"), Some(11));
        assert_eq!(vm.vcpu_sum("exits"), Some(12));
    }

    #[test]
    fn samples_are_positional() {
        let stats: BTreeMap<String, u64> = [
            (STAT_EXIT_CYCLES.to_string(), 9),
            (STAT_EXITS.to_string(), 3),
        ]
        .into();
        let v = sample_values(&stats);
        assert_eq!(v.len(), SAMPLED_STATS.len());
        assert_eq!(&v[..3], &[Some(3), Some(9), None]);
        assert_eq!(sample_stats(&v), stats);
        let line = Msg::Sample {
            t_us: 1,
            tag: None,
            v,
            r: vec![],
        }
        .to_line();
        assert!(line.len() < 100, "{line}");
    }

    #[test]
    fn a_sample_carries_the_reasons_that_changed_and_they_rebuild_the_table() {
        let c = |exits, cycles| ReasonCount { exits, cycles };
        let first: ReasonTotals = [(10, c(5, 500)), (30, c(2, 900))].into();
        let second: ReasonTotals = [(10, c(7, 700)), (30, c(2, 900)), (48, c(1, 50))].into();
        let u1 = reason_updates(&ReasonTotals::new(), &first);
        let u2 = reason_updates(&first, &second);
        assert_eq!(u2, vec![[10, 7, 700], [48, 1, 50]]);
        let mut table = ReasonTotals::new();
        apply_reason_updates(&mut table, &u1);
        assert_eq!(table, first);
        apply_reason_updates(&mut table, &u2);
        assert_eq!(table, second);
        // Nothing changed: nothing sent, and the line stays as short as without reasons.
        assert!(reason_updates(&second, &second).is_empty());
        let line = Msg::Sample {
            t_us: 1,
            tag: None,
            v: vec![],
            r: vec![],
        }
        .to_line();
        assert!(!line.contains("\"r\""), "{line}");
    }

    #[test]
    fn shell_codes() {
        assert_eq!(Status::Code(3).shell_code(), 3);
        assert_eq!(Status::Signal(9).shell_code(), 137);
        assert!(!Status::Code(1).success());
    }
}
