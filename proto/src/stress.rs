//! The stress workload's contract: what labctl asks `/guest/stress` to do (its arguments)
//! and the one JSON line it prints when done.

use serde::{Deserialize, Serialize};

use crate::leaf::ExitStats;

/// Where the stress program lives in the images.
pub const PROGRAM: &str = "/guest/stress";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StressSpec {
    /// Threads, each pinned to vCPU `index % vCPUs`.
    pub threads: u32,
    /// CPUIDs each thread executes.
    pub iterations: u64,
    /// The CPUID leaf (EAX) and subleaf (ECX) executed.
    pub leaf: u32,
    pub subleaf: u32,
}

impl StressSpec {
    /// The program's command line.
    pub fn argv(&self) -> Vec<String> {
        vec![
            PROGRAM.to_string(),
            "--threads".into(),
            self.threads.to_string(),
            "--iterations".into(),
            self.iterations.to_string(),
            "--leaf".into(),
            format!("{:#x}", self.leaf),
            "--subleaf".into(),
            format!("{:#x}", self.subleaf),
        ]
    }

    /// Parses the command line [`argv`](Self::argv) produces (without the program name).
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        let mut spec = StressSpec {
            threads: 0,
            iterations: 0,
            leaf: 0,
            subleaf: 0,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--threads" => spec.threads = parse_u64(value)? as u32,
                "--iterations" => spec.iterations = parse_u64(value)?,
                "--leaf" => spec.leaf = parse_u32(value)?,
                "--subleaf" => spec.subleaf = parse_u32(value)?,
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        if spec.threads == 0 || spec.iterations == 0 {
            return Err("--threads and --iterations must be at least 1".into());
        }
        Ok(spec)
    }
}

/// A number in decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal, or hex with 0x)"))
}

pub fn parse_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_u64(s)?).map_err(|_| format!("{s:?} does not fit in 32 bits"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreadReport {
    pub index: u32,
    /// The CPU the thread was pinned to, and the one it ran on (checked before and after).
    pub cpu_wanted: u32,
    pub cpu_seen: u32,
    pub elapsed_ns: u64,
}

/// What the stress program prints, as one JSON line, when all threads are done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StressReport {
    pub spec: StressSpec,
    pub cpus: u32,
    /// Leaf readings just before the threads start, and just after they all finished.
    pub before: ExitStats,
    pub after: ExitStats,
    /// CPUID's own reason (leaf 0x4FFFFFFE, SDM reason 10) read just after `before` and
    /// just before `after`; `None` if the per-reason leaf did not answer.
    #[serde(default)]
    pub cpuid_before: Option<ExitStats>,
    #[serde(default)]
    pub cpuid_after: Option<ExitStats>,
    pub threads: Vec<ThreadReport>,
    /// From the start barrier to the last thread's end.
    pub wall_ns: u64,
}

impl StressReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("reports always serialize")
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_round_trips() {
        let s = StressSpec {
            threads: 4,
            iterations: 10_000,
            leaf: 0x4FFF_FFFF,
            subleaf: 3,
        };
        let argv = s.argv();
        assert_eq!(argv[0], PROGRAM);
        assert_eq!(StressSpec::from_args(&argv[1..]).unwrap(), s);
    }

    #[test]
    fn rejects_bad_arguments() {
        let a = |v: &[&str]| {
            StressSpec::from_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert!(a(&["--threads", "0", "--iterations", "5"]).is_err());
        assert!(a(&["--threads", "1"]).is_err());
        assert!(a(&[
            "--threads",
            "1",
            "--iterations",
            "1",
            "--leaf",
            "0x1FFFFFFFF"
        ])
        .is_err());
        assert!(a(&["--threads", "1", "--iterations", "1", "--bogus", "1"]).is_err());
        assert!(a(&["--threads"]).is_err());
        assert_eq!(parse_u32("0x4FFFFFFF"), Ok(0x4FFF_FFFF));
        assert_eq!(parse_u32("16"), Ok(16));
        assert!(parse_u32("leaf").is_err());
    }
}
