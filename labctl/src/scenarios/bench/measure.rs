//! What the benchmarks share: the plain exit they time, switching the accounting, and a
//! measured variant's statistics.

use exitlab_proto::job::Step;
use exitlab_proto::leaf::LEAF;
use serde::Serialize;

/// The plain exit measured by the on/off variants: CPUID leaf 0, answered from the table.
pub const PLAIN: (u32, u32) = (0, 0);

pub fn set_accounting(on: bool) -> Step {
    Step::SetKvmParam {
        name: "exit_accounting".into(),
        value: if on { "Y" } else { "N" }.into(),
    }
}

/// One measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: String,
    pub kernel: String,
    pub accounting: String,
    pub leaf: String,
    pub l2_vcpus: u32,
    /// Instructions per exit round trip, one per repeat.
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / median, in percent: what interference added to some windows.
    pub spread_pct: f64,
    /// (second lowest - lowest) / lowest, in percent: how well the two undisturbed
    /// repeats agree. Interference (timer interrupts, L1's housekeeping) only ever adds
    /// instructions to a window, so the lowest repeats are the undisturbed figure.
    pub agreement_pct: f64,
}

impl Variant {
    pub fn new(
        name: &str,
        kernel: &str,
        accounting: &str,
        (leaf, subleaf): (u32, u32),
        vcpus: u32,
        samples: Vec<f64>,
    ) -> Self {
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        let median = if s.is_empty() {
            0.0
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        let (min, max) = (
            s.first().copied().unwrap_or(0.0),
            s.last().copied().unwrap_or(0.0),
        );
        Variant {
            name: name.into(),
            kernel: kernel.into(),
            accounting: accounting.into(),
            leaf: if leaf == LEAF || leaf == 0 {
                format!("{leaf:#x}")
            } else {
                format!("{leaf:#x}/{subleaf:#x}")
            },
            l2_vcpus: vcpus,
            samples,
            median,
            min,
            max,
            spread_pct: if median > 0.0 {
                (max - min) / median * 100.0
            } else {
                0.0
            },
            agreement_pct: match s.as_slice() {
                [a, b, ..] if *a > 0.0 => (b - a) / a * 100.0,
                _ => 0.0,
            },
        }
    }
}
