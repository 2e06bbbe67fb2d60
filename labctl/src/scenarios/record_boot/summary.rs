//! summary.yaml: what a recording found, its checks and where its files are.

use std::collections::BTreeMap;
use std::path::PathBuf;

use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::Msg;
use serde::Serialize;

use super::series::{Phase, PhaseReason};
use crate::verify::Check;

#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    pub schema: &'static str,
    /// `minimal` or `debian`.
    pub guest: &'static str,
    pub l2_kernel: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub interval_ms: u32,
    pub idle_s: u32,
    /// False if the boot did not reach its end (timeout, crash): the series is partial.
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub samples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_bytes: Option<SampleBytes>,
    pub events_s: BTreeMap<&'static str, f64>,
    pub totals: Totals,
    pub phases: &'a [Phase],
    pub guest_reading: Option<ExitStats>,
    pub kvm_exit_tracepoint: &'static str,
    pub checks: &'a [Check],
    pub files: BTreeMap<&'static str, PathBuf>,
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub exits: u64,
    pub exit_cycles: u64,
    pub seconds: f64,
    /// The whole recording by SDM reason, most exits first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<PhaseReason>,
}

/// What the samples cost the protocol link (L1's ttyS1, shared with the console relay).
#[derive(Debug, Serialize)]
pub struct SampleBytes {
    pub mean: f64,
    pub max: usize,
    /// Mean bytes per second over the recording.
    pub per_s: f64,
}

/// Bytes per sample message on the link, from the messages as they were sent.
pub fn sample_bytes(msgs: &[Msg], seconds: f64) -> Option<SampleBytes> {
    let sizes: Vec<usize> = msgs
        .iter()
        .filter(|m| matches!(m, Msg::Sample { .. }))
        .map(|m| m.to_line().len())
        .collect();
    let total: usize = sizes.iter().sum();
    (!sizes.is_empty()).then(|| SampleBytes {
        mean: total as f64 / sizes.len() as f64,
        max: sizes.iter().copied().max().unwrap_or(0),
        per_s: if seconds > 0.0 {
            total as f64 / seconds
        } else {
            0.0
        },
    })
}
