//! KVM's own statistics of a VM run by QEMU, read in L1.
//!
//! - VM-wide sums come from debugfs, `/sys/kernel/debug/kvm/<qemu pid>-<vm fd>/<stat>`:
//!   reading them does not disturb the VM.
//! - Per-vCPU values come from QEMU's QMP `query-stats` (QEMU 7.1+), which reads each
//!   vCPU's binary statistics fd (`KVM_GET_STATS_FD`). KVM refuses vCPU ioctls from any
//!   process but the VM's own, so QEMU has to do it; it runs the read on each vCPU thread,
//!   which kicks that vCPU out of the guest once (an exit, counted like any other).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use exitlab_proto::msg::{
    stat_sdm_reason_exits, stat_slot_sum, ReasonTotals, VcpuStats, VmStats, STAT_REASON_CYCLES,
    STAT_REASON_EXITS,
};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("no KVM debugfs directory for process {0} under /sys/kernel/debug/kvm (is debugfs mounted and CONFIG_DEBUG_FS set?)")]
    NoDebugfs(i32),
    #[error("the VM is being destroyed: its statistics are going away")]
    VmGone,
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StatsError {
    let what = what.into();
    move |source| StatsError::Io { what, source }
}

/// Reads the statistics of the VM that QEMU process `pid` runs.
pub struct VmStatsReader {
    pid: i32,
    qmp_socket: PathBuf,
    qmp: Option<Qmp>,
}

impl VmStatsReader {
    pub fn new(pid: i32, qmp_socket: &Path) -> Self {
        Self {
            pid,
            qmp_socket: qmp_socket.to_path_buf(),
            qmp: None,
        }
    }

    /// VM-wide sums first (undisturbed), then each vCPU.
    pub fn read(&mut self) -> Result<VmStats, StatsError> {
        let vm = read_debugfs(self.pid)?;
        let vcpus = self.qmp()?.vcpu_stats()?;
        Ok(VmStats { vm, vcpus })
    }

    /// Makes QEMU's main loop run once: a command over QMP is handled there.
    pub fn wake(&mut self) -> Result<(), StatsError> {
        self.qmp()?.execute("query-status", json!({}))?;
        Ok(())
    }

    fn qmp(&mut self) -> Result<&mut Qmp, StatsError> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_socket)?);
        }
        Ok(self.qmp.as_mut().expect("connected above"))
    }
}

/// The VM's debugfs directory, once KVM has created the VM.
pub fn debugfs_dir(pid: i32) -> Result<PathBuf, StatsError> {
    let root = Path::new("/sys/kernel/debug/kvm");
    let prefix = format!("{pid}-");
    fs::read_dir(root)
        .map_err(|_| StatsError::NoDebugfs(pid))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .ok_or(StatsError::NoDebugfs(pid))
}

/// Some statistics of the VM, summed over its vCPUs, from its debugfs directory `dir`.
/// Fails once the VM is gone (its directory is removed when the VM is destroyed).
pub fn read_some(dir: &Path, names: &[&str]) -> Result<BTreeMap<String, u64>, StatsError> {
    let mut out = BTreeMap::new();
    for name in names {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => {
                if let Ok(v) = text.trim().parse::<u64>() {
                    out.insert(name.to_string(), v);
                }
            }
            // A statistic this kernel does not have is left out; a vanished VM is an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.exists() => {}
            Err(e) => return Err(io(path.display().to_string())(e)),
        }
    }
    Ok(out)
}

/// Per-reason statistics: arrays, whose generic debugfs file shows only their first
/// element (slot 0), which would read as a total. The per-reason figures are in the VM's
/// `exit_reasons` file instead.
const ARRAY_STATS: [&str; 2] = [STAT_REASON_EXITS, STAT_REASON_CYCLES];

/// The VM's exits and cycles by SDM reason from its `exit_reasons` file (`code sdm exits
/// cycles` lines, `-` for a slot with no SDM reason), summed over the codes of each reason.
pub fn sdm_reason_totals(text: &str) -> ReasonTotals {
    let mut out = ReasonTotals::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [_, sdm, exits, cycles] = f[..] {
            if let (Ok(sdm), Ok(exits), Ok(cycles)) = (
                sdm.parse::<u32>(),
                exits.parse::<u64>(),
                cycles.parse::<u64>(),
            ) {
                let c = out.entry(sdm).or_default();
                c.exits += exits;
                c.cycles += cycles;
            }
        }
    }
    out
}

/// [`sdm_reason_totals`]'s exits, under the names [`VmStats::vm`] carries them by.
pub fn sdm_reason_exits(text: &str) -> BTreeMap<String, u64> {
    sdm_reason_totals(text)
        .into_iter()
        .map(|(r, c)| (stat_sdm_reason_exits(r), c.exits))
        .collect()
}

/// The VM's per-reason table from its debugfs directory `dir`; `None` on a kernel without
/// the `exit_reasons` file (or once the VM is gone).
pub fn read_reasons(dir: &Path) -> Option<ReasonTotals> {
    fs::read_to_string(dir.join("exit_reasons"))
        .ok()
        .map(|t| sdm_reason_totals(&t))
}

/// Every numeric file of the VM's debugfs directory: the VM statistics and the vCPU
/// statistics summed over vCPUs (but for the arrays' first elements).
fn read_debugfs(pid: i32) -> Result<BTreeMap<String, u64>, StatsError> {
    let dir = debugfs_dir(pid)?;
    let mut out = BTreeMap::new();
    for e in fs::read_dir(&dir)
        .map_err(io(dir.display().to_string()))?
        .flatten()
    {
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if ARRAY_STATS.contains(&name.as_str()) {
            continue;
        }
        if name == "exit_reasons" {
            if let Ok(text) = fs::read_to_string(e.path()) {
                out.extend(sdm_reason_exits(&text));
            }
            continue;
        }
        if let Ok(text) = fs::read_to_string(e.path()) {
            if let Ok(v) = text.trim().parse::<u64>() {
                out.insert(name, v);
            }
        }
    }
    Ok(out)
}

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self, StatsError> {
        let s =
            UnixStream::connect(path).map_err(io(format!("connecting to {}", path.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("QMP socket timeout"))?;
        let writer = s.try_clone().map_err(io("QMP socket"))?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.next_line()?;
        if greeting.get("QMP").is_none() {
            return Err(StatsError::Qmp(format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn next_line(&mut self) -> Result<Value, StatsError> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .map_err(io("reading QMP"))?
            == 0
        {
            return Err(StatsError::Qmp("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| StatsError::Qmp(format!("{e}: {line}")))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, StatsError> {
        let req = json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(io("writing QMP"))?;
        loop {
            let v = self.next_line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(StatsError::Qmp(format!("{command}: {e}")));
            }
        }
    }

    fn vcpu_stats(&mut self) -> Result<Vec<VcpuStats>, StatsError> {
        let cpus = self.execute("query-cpus-fast", json!({}))?;
        let stats = self.execute("query-stats", json!({ "target": "vcpu" }))?;
        parse_query_stats(&cpus, &stats)
    }
}

/// Joins `query-cpus-fast` (cpu-index ↔ qom-path) with `query-stats` (qom-path → stats).
/// Only scalar values are kept; histograms are dropped.
pub fn parse_query_stats(cpus: &Value, stats: &Value) -> Result<Vec<VcpuStats>, StatsError> {
    let bad = |what: &str| StatsError::Qmp(format!("unexpected reply: {what}"));
    let mut index_of = BTreeMap::new();
    for c in cpus.as_array().ok_or_else(|| bad("query-cpus-fast"))? {
        let path = c["qom-path"].as_str().ok_or_else(|| bad("qom-path"))?;
        let idx = c["cpu-index"].as_u64().ok_or_else(|| bad("cpu-index"))?;
        index_of.insert(path.to_string(), idx as u32);
    }
    let mut out = Vec::new();
    for r in stats.as_array().ok_or_else(|| bad("query-stats"))? {
        if r["provider"].as_str() != Some("kvm") {
            continue;
        }
        let path = r["qom-path"].as_str().ok_or_else(|| bad("qom-path"))?;
        let id = *index_of
            .get(path)
            .ok_or_else(|| bad("a vCPU missing from query-cpus-fast"))?;
        let mut map = BTreeMap::new();
        for s in r["stats"].as_array().ok_or_else(|| bad("stats"))? {
            let (Some(name), value) = (s["name"].as_str(), &s["value"]) else {
                continue;
            };
            let v = match value {
                Value::Number(n) => n.as_u64(),
                Value::Bool(b) => Some(u64::from(*b)),
                // A per-reason array: carried as its sum over the slots.
                Value::Array(a) if ARRAY_STATS.contains(&name) => {
                    map.insert(
                        stat_slot_sum(name),
                        a.iter().filter_map(Value::as_u64).sum(),
                    );
                    None
                }
                _ => None,
            };
            if let Some(v) = v {
                map.insert(name.to_string(), v);
            }
        }
        out.push(VcpuStats { id, stats: map });
    }
    out.sort_by_key(|v| v.id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_sum_by_sdm_reason() {
        let text = "code sdm exits cycles\n0x72 10 5 100\n0x7c 31 2 9\n0x7c 32 3 9\n0x400 48 7 1\n0x401 - 4 4\n";
        let m = sdm_reason_exits(text);
        assert_eq!(m.get("exit_reasons_sdm_10"), Some(&5));
        assert_eq!(m.get("exit_reasons_sdm_32"), Some(&3));
        assert_eq!(m.get("exit_reasons_sdm_48"), Some(&7));
        assert_eq!(m.len(), 4, "{m:?}");
        let t =
            sdm_reason_totals("code sdm exits cycles\n0x72 10 5 100\n0x4e 10 1 20\n0x401 - 4 4\n");
        assert_eq!((t[&10].exits, t[&10].cycles), (6, 120));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn joins_cpus_and_stats() {
        let cpus = json!([
            {"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 10},
            {"cpu-index": 1, "qom-path": "/machine/unattached/device[2]", "thread-id": 11}
        ]);
        let stats = json!([
            {"provider": "kvm", "qom-path": "/machine/unattached/device[2]",
             "stats": [{"name": "exits", "value": 7}, {"name": "guest_mode", "value": false},
                       {"name": "halt_poll_hist", "value": [1, 2]},
                       {"name": "exit_reason_exits", "value": [3, 0, 4]}]},
            {"provider": "kvm", "qom-path": "/machine/unattached/device[0]",
             "stats": [{"name": "exits", "value": 5}, {"name": "exit_cycles", "value": 123456789012u64}]}
        ]);
        let v = parse_query_stats(&cpus, &stats).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].id, 0);
        assert_eq!(v[0].stats["exit_cycles"], 123_456_789_012);
        assert_eq!(v[1].stats["exits"], 7);
        assert_eq!(v[1].stats["guest_mode"], 0);
        assert!(!v[1].stats.contains_key("halt_poll_hist"));
        assert_eq!(v[1].stats["exit_reason_exits_sum"], 7);
        assert!(!v[1].stats.contains_key("exit_reason_exits"));
    }

    #[test]
    fn rejects_unknown_vcpus() {
        let stats = json!([{"provider": "kvm", "qom-path": "/x", "stats": []}]);
        assert!(parse_query_stats(&json!([]), &stats).is_err());
    }
}
