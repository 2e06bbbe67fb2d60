//! The stress workload: T threads, each pinned to its own vCPU, start together and execute
//! CPUID (a VM exit each) K times. The leaf 0x4FFFFFFF, and CPUID's own reason through
//! 0x4FFFFFFE, are read just before and just after;
//! the result is one JSON line ([`exitlab_proto::stress::StressReport`]) on stdout.
//!
//! Usage: stress --threads T --iterations K [--leaf L] [--subleaf S]

use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use exitlab_guest::leaf;
use exitlab_proto::stress::{StressReport, StressSpec, ThreadReport};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).unwrap_or(u32::MAX)
}

fn pin(cpu: u32) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu as usize).context("CPU number")?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

fn hammer(spec: StressSpec) {
    for _ in 0..spec.iterations {
        // Each CPUID is one VM exit under KVM, whatever the leaf.
        std::hint::black_box(raw_cpuid::cpuid!(spec.leaf, spec.subleaf));
    }
}

fn run(spec: StressSpec) -> Result<StressReport> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let barrier = Arc::new(Barrier::new(spec.threads as usize + 1));
    let mut handles = Vec::new();
    for index in 0..spec.threads {
        let barrier = Arc::clone(&barrier);
        let cpu = index % cpus;
        handles.push(std::thread::spawn(move || -> Result<ThreadReport> {
            let pinned = pin(cpu);
            barrier.wait();
            pinned?;
            let seen_before = current_cpu();
            let start = Instant::now();
            hammer(spec);
            let elapsed_ns = start.elapsed().as_nanos() as u64;
            let seen_after = current_cpu();
            Ok(ThreadReport {
                index,
                cpu_wanted: cpu,
                cpu_seen: if seen_before == seen_after {
                    seen_after
                } else {
                    u32::MAX
                },
                elapsed_ns,
            })
        }));
    }
    let before = leaf::read().context("reading the leaf before")?;
    let cpuid_before = leaf::read_cpuid_reason();
    let start = Instant::now();
    barrier.wait();
    let mut threads = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => threads.push(r?),
            Err(_) => bail!("a stress thread panicked"),
        }
    }
    let wall_ns = start.elapsed().as_nanos() as u64;
    let cpuid_after = leaf::read_cpuid_reason();
    let after = leaf::read().context("reading the leaf after")?;
    Ok(StressReport {
        spec,
        cpus,
        before,
        after,
        cpuid_before,
        cpuid_after,
        threads,
        wall_ns,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match StressSpec::from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "stress: {e}\nusage: stress --threads T --iterations K [--leaf L] [--subleaf S]"
            );
            return ExitCode::from(2);
        }
    };
    match run(spec) {
        Ok(report) => {
            println!("{}", report.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stress: {e:#}");
            ExitCode::FAILURE
        }
    }
}
