//! `labctl bench`: what the exit accounting costs (`exit_cost`), how the lab scales
//! (`scaling`), how fast it turns around (`turnaround`).
//!
//! `exit-cost` boots L1 under single-threaded TCG with `-icount shift=0,sleep=off`: L1's
//! clock then advances exactly 1 ns per executed instruction, and L2's clock (kvmclock,
//! derived from L1's TSC) with it. The stress program in L2, with one thread, times M
//! CPUIDs; nanoseconds per CPUID are L1 (and L2) instructions per exit round trip, a
//! deterministic figure instead of a noisy wall-clock one.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::Global;

pub mod exit_cost;
mod measure;
pub mod scaling;
pub mod turnaround;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Instructions per CPUID exit round trip (L1 under -icount): accounting on, off,
    /// unpatched, and the leaf query with 1 and many vCPUs. Checks the README's goals.
    ExitCost(exit_cost::ExitCostArgs),
    /// Exits/s with 1, 2, 4 L2 vCPUs, accounting on vs off (wall clock: noisy).
    Scaling(scaling::ScalingArgs),
    /// Where the edit-and-rerun loop's time goes: `labctl lab` N times, step by step
    /// (build check, image, L1 up, L2 up, programs, power-off, results); a rebuild after
    /// touching a KVM file plus the lab; `stress --vcpus 4`; with --cold, a cold build.
    /// Checks the README's goals.
    Turnaround(turnaround::TurnaroundArgs),
}

impl BenchCommand {
    pub fn run(self, g: &Global) -> Result<i32> {
        match self {
            BenchCommand::ExitCost(a) => a.run(g),
            BenchCommand::Scaling(a) => a.run(g),
            BenchCommand::Turnaround(a) => a.run(g),
        }
    }
}
