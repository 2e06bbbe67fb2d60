//! labctl: builds the patched kernel and the lab's images, boots the nested lab
//! (host → L1 with the patched KVM → L2), runs scenarios in it and verifies the exit
//! counters against KVM's own statistics.
//!
//! Layout, top down (docs/architecture.md has the picture and where to change what):
//! `main` dispatches to `scenarios/` (one file per subcommand) → `engine` (Lab: build,
//! boot, run a job, collect what the guests said) → `verify` (checks) and `report`
//! (results) → `images`, `boot`, `accel` → `kernel`, `series` → `config` →
//! `exitlab_proto` (the host↔guest contract). Support: `progress`, `process`, `lock`,
//! `doctor`, `error`.

mod accel;
mod boot;
mod cli;
mod config;
mod debian;
mod doctor;
mod engine;
mod error;
mod images;
mod kernel;
mod lock;
mod process;
mod progress;
mod report;
mod scenarios;
mod series;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cli::{Global, LabArgs};
use crate::error::{code, LabError};
use crate::scenarios::{
    bench::BenchCommand, exec::ExecArgs, host_recipe::HostRecipeArgs,
    kvm_selftests::KvmSelftestsArgs, record_boot::RecordArgs, soak::SoakArgs, stress::StressArgs,
};

const EXIT_CODES: &str = "Exit status: 0 success; 1 a scenario's check failed; 2 setup error (missing tool, bad input, failed build); 124 timeout (a VM hung and was killed); 125 a guest kernel panicked; 126 QEMU crashed or a VM stopped without reporting. `exec` exits with the guest command's own status (128+N if killed by signal N, 127 if it could not be started).";

#[derive(Parser)]
#[command(name = "labctl", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Lab configuration file (default: ./lab.yaml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The kvm-exit-lab repository (kernel/<series>/patches, kernel/lab.config, guest sources).
    #[arg(long, global = true, value_name = "DIR", env = "LABCTL_REPO")]
    repo: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the patched kernel, the selftest, the guest programs and the L1 image.
    Build(LabArgs),
    /// Boot the lab and run test_assignment2 twice in L2, then test_assignment3; check
    /// the readings against KVM's statistics.
    Lab(LabArgs),
    /// Run a command in L2, after copying host files into its working directory.
    Exec(ExecArgs),
    /// Run the patch series' KVM selftest inside L1, on the patched KVM.
    Selftest(LabArgs),
    /// CPUID stress from one or more vCPUs at once, checked against KVM's statistics.
    Stress(StressArgs),
    /// Benchmarks: the exit accounting's cost, its scaling, the lab's turnaround.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Exits across a full VM boot, sampled in L1: CSV, YAML and a plot with the phases.
    RecordBoot(RecordArgs),
    /// The kernel quality gate: checkpatch --strict on every patch, make W=1 arch/x86/kvm.
    KernelCheck(LabArgs),
    /// KVM's own selftests, built from the patched tree and run in L1: they must pass (or
    /// skip) on the patched kernel, and with --baseline give the same outcome as unpatched.
    KvmSelftests(KvmSelftestsArgs),
    /// Boot L2 with L1's KVM using nested paging, then shadow paging (kvm_amd.npt=0,
    /// kvm_intel.ept=0); compare the boots' exits by reason (test_assignment3) side by side.
    ComparePaging(LabArgs),
    /// The README's recipe for installing the patched KVM on your own host
    /// (scripts/host-install), run end to end on Debian's own kernel in L1: build the
    /// modules against it, swap them for Debian's, run the lab's L2 programs, restore.
    HostRecipe(HostRecipeArgs),
    /// List what the lab needs from this machine, and how to install what is missing.
    Doctor,
    /// Run a scenario N times: each run's outcome, time and stalls, and the failure and
    /// stall rates (e.g. `labctl soak --runs 100 lab`, `labctl soak --runs 30 stress --vcpus 4`).
    Soak(SoakArgs),
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let g = Global {
        config: cli.config,
        repo: cli.repo,
        sh: std::rc::Rc::new(xshell::Shell::new()?),
    };
    match cli.command {
        Command::Doctor => Ok(if doctor::report() {
            0
        } else {
            code::SETUP.into()
        }),
        Command::Soak(a) => a.run(&g),
        Command::Build(a) => scenarios::build::run(&g.lab(a)?),
        Command::KernelCheck(a) => scenarios::kernel_check::run(&g.lab(a)?),
        Command::Lab(a) => scenarios::lab::run(&g.lab(a)?),
        Command::Exec(a) => a.run(&g),
        Command::Selftest(a) => scenarios::selftest::run(&g.lab(a)?),
        Command::Stress(a) => a.run(&g),
        Command::Bench(b) => b.run(&g),
        Command::RecordBoot(a) => a.run(&g),
        Command::KvmSelftests(a) => a.run(&g),
        Command::ComparePaging(a) => scenarios::compare_paging::run(&g.lab(a)?),
        Command::HostRecipe(a) => a.run(&g),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) => ExitCode::from(c.clamp(0, 255) as u8),
        Err(e) => {
            let code = e
                .downcast_ref::<LabError>()
                .map_or(code::SETUP, LabError::exit_code);
            eprintln!("labctl: {e:#}");
            if lock::is_disk_full(&e) {
                eprintln!(
                    "labctl: the disk is full. Free some space (`df -h` shows where), or pass --build-dir on a larger disk, then run the same command again: what was half-written is not used, and the build resumes."
                );
            }
            ExitCode::from(code)
        }
    }
}
