//! labctl: builds the patched kernel and the lab's images, boots the nested lab
//! (host → L1 with the patched KVM → L2), runs scenarios in it and verifies the exit
//! counters against KVM's own statistics.
//!
//! Pipeline, one module per stage: config → kernel → images → boot → scenario → verify → report.

mod accel;
mod bench;
mod boot;
mod config;
mod debian;
mod doctor;
mod error;
mod host_recipe;
mod images;
mod kernel;
mod kvm_selftests;
mod lock;
mod paging;
mod plot;
mod progress;
mod record;
mod report;
mod scenario;
mod series;
mod soak;
mod turnaround;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{AccelChoice, FileConfig, LabConfig, Overrides};
use crate::error::{code, LabError};
use crate::images::Artifacts;
use crate::scenario::Lab;

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

#[derive(Args, Clone, Default)]
struct CommonArgs {
    /// How to run L1: hardware KVM (checked to work and to nest), TCG, or auto.
    #[arg(long, value_enum)]
    accel: Option<AccelChoice>,
    /// Seconds the whole run may take before the VMs are killed.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Memory of the L2 test VM (MiB, or with M/G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_memory)]
    memory: Option<u32>,
    /// vCPUs of L1 (default: 1 under TCG, where L1 vCPUs running at once crash nested
    /// guests now and then, see README "Reliability"; 2-4 on hardware KVM).
    #[arg(long, value_name = "N")]
    l1_vcpus: Option<u32>,
    /// Memory of L1 (MiB, or with M/G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_memory)]
    l1_memory: Option<u32>,
    /// The Linux version to build the lab's kernel from: its port of the patch series
    /// (kernel/<version>/) and its source (default: 6.12, or lab.yaml's kernel_series).
    #[arg(long, value_enum, value_name = "VERSION")]
    kernel_series: Option<series::KernelSeries>,
    /// Kernel source: a tree or tarball of the series' version (default:
    /// /usr/src/linux-source-<version>.tar.*, e.g. linux-source-6.12).
    #[arg(long, value_name = "DIR|TARBALL")]
    kernel_src: Option<PathBuf>,
    /// Where builds, images and run logs go (default: <repo>/build).
    #[arg(long, value_name = "DIR")]
    build_dir: Option<PathBuf>,
    /// Prebuilt patched bzImage (with --selftest: skips the kernel build).
    #[arg(long, value_name = "FILE", env = "LABCTL_KERNEL")]
    kernel: Option<PathBuf>,
    /// Prebuilt exit_stats_test selftest binary.
    #[arg(long, value_name = "FILE", env = "LABCTL_SELFTEST")]
    selftest: Option<PathBuf>,
    /// Directory with prebuilt static guest programs (lab-init, test_assignment2).
    #[arg(long, value_name = "DIR", env = "LABCTL_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Prebuilt L1 base image (skips image assembly; needs --kernel).
    #[arg(long, value_name = "FILE", env = "LABCTL_L1_IMAGE")]
    l1_image: Option<PathBuf>,
    /// Extra kernel command line for L1, e.g. `kvm.exit_accounting=0`.
    #[arg(long, value_name = "ARGS", default_value = "")]
    l1_cmdline: String,
}

#[derive(Args, Clone)]
struct KvmSelftestsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Tests to run: paths under tools/testing/selftests/kvm, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          default_values_t = kvm_selftests::DEFAULT_TESTS.map(String::from))]
    tests: Vec<String>,
    /// An unpatched bzImage (same source and config) to run the same tests on, e.g.
    /// build/baseline/kernel/obj/arch/x86/boot/bzImage after `labctl bench exit-cost
    /// --lab-kernel` (the lab's configuration: the bench's default kernels have jump
    /// labels, which L1 under multi-threaded TCG can crash on).
    #[arg(long, value_name = "BZIMAGE")]
    baseline: Option<PathBuf>,
}

#[derive(Args, Clone, Default)]
struct LabArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// vCPUs of the L2 test VM.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
}

impl From<CommonArgs> for LabArgs {
    fn from(common: CommonArgs) -> Self {
        LabArgs {
            common,
            vcpus: None,
        }
    }
}

/// `--vcpus 1,2,4`.
#[derive(Debug, Clone)]
struct VcpuList(Vec<u32>);

fn vcpu_list(s: &str) -> Result<VcpuList, String> {
    scenario::parse_vcpu_list(s).map(VcpuList)
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Instructions per CPUID exit round trip (L1 under -icount): accounting on, off,
    /// unpatched, and the leaf query with 1 and many vCPUs. Checks the README's goals.
    ExitCost(ExitCostArgs),
    /// Exits/s with 1, 2, 4 L2 vCPUs, accounting on vs off (wall clock: noisy).
    Scaling(ScalingArgs),
    /// Where the edit-and-rerun loop's time goes: `labctl lab` N times, step by step
    /// (build check, image, L1 up, L2 up, programs, power-off, results); a rebuild after
    /// touching a KVM file plus the lab; `stress --vcpus 4`; with --cold, a cold build.
    /// Checks the README's goals.
    Turnaround(TurnaroundArgs),
}

#[derive(Args)]
struct TurnaroundArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// `labctl lab` runs (everything built).
    #[arg(long, value_name = "N", default_value = "10")]
    runs: u32,
    /// `labctl stress --vcpus 4` runs (0: none).
    #[arg(long, value_name = "M", default_value = "10")]
    stress_runs: u32,
    /// Also time a cold build in a scratch build directory (about 6 minutes on 2 cores).
    #[arg(long)]
    cold: bool,
}

#[derive(Args)]
struct ExitCostArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// CPUIDs per measurement.
    #[arg(long, value_name = "M", default_value = "20000", value_parser = parse_count)]
    count: u64,
    /// Measurements per variant (at least 2).
    #[arg(long, value_name = "R", default_value = "5")]
    repeats: u32,
    /// The unpatched bzImage to compare with (default: build it from the same source).
    #[arg(long, value_name = "BZIMAGE", conflicts_with = "no_baseline")]
    baseline: Option<PathBuf>,
    /// Skip the unpatched comparison.
    #[arg(long)]
    no_baseline: bool,
    /// vCPUs of the VM for the many-vCPU leaf query cost (0 skips it).
    #[arg(long, value_name = "N", default_value = "8")]
    wide_vcpus: u32,
    /// Measure the lab's own kernel configuration (no jump labels) instead of
    /// lab.config + CONFIG_JUMP_LABEL=y, the way distributions build kernels.
    #[arg(long)]
    lab_kernel: bool,
}

#[derive(Args)]
struct ScalingArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// L2 vCPU counts.
    #[arg(long, value_name = "N[,N...]", value_parser = vcpu_list, default_value = "1,2,4")]
    vcpus: VcpuList,
    /// CPUIDs per thread per run.
    #[arg(long, value_name = "K", default_value = "10000", value_parser = parse_count)]
    iterations: u64,
    /// Runs per vCPU count and accounting setting.
    #[arg(long, value_name = "R", default_value = "3")]
    repeats: u32,
}

#[derive(Args)]
struct StressArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// L2 vCPUs; a list (1,2,4) runs a sweep, one boot per count, and prints a table.
    #[arg(long, value_name = "N[,N...]", value_parser = vcpu_list, default_value = "1")]
    vcpus: VcpuList,
    /// Threads, each pinned to its own vCPU (default: as many as vCPUs; more is allowed).
    #[arg(long, value_name = "T")]
    threads: Option<u32>,
    /// CPUIDs each thread executes.
    #[arg(long, value_name = "K", default_value = "10000", value_parser = parse_count)]
    iterations: u64,
    /// The CPUID leaf executed (EAX), decimal or 0x hex. Every leaf exits under KVM.
    #[arg(long, value_name = "L", default_value = "0", value_parser = parse_leaf)]
    leaf: u32,
    /// The CPUID subleaf (ECX).
    #[arg(long, value_name = "S", default_value = "0", value_parser = parse_leaf)]
    subleaf: u32,
}

fn parse_count(s: &str) -> Result<u64, String> {
    exitlab_proto::stress::parse_u64(s)
}

fn parse_leaf(s: &str) -> Result<u32, String> {
    exitlab_proto::stress::parse_u32(s)
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    lab: LabArgs,
    /// The guest that boots: the lab's minimal L2, or Debian (debootstrap; built once, needs root).
    #[arg(long, value_enum, default_value = "minimal")]
    guest: record::Guest,
    /// Sampling interval in milliseconds.
    #[arg(long, value_name = "MS", default_value = "20")]
    interval: u32,
    /// Seconds the booted guest idles before it shuts down (the plot's idle phase).
    #[arg(long, value_name = "SECONDS", default_value = "5")]
    idle: u32,
    /// Output directory for samples.csv, summary.yaml, exits.svg, exits.png
    /// (default: build/record-boot/<guest>-<N>vcpu).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct HostRecipeArgs {
    #[command(flatten)]
    lab: LabArgs,
    /// Debian's kernel to run the recipe on: the one of the installed
    /// linux-source-6.12's (or -6.1's) version, with the series' port to it.
    /// (`--kernel` and `--kernel-series` are the lab's own kernel, which L2 boots here.)
    #[arg(long, value_enum, default_value = "debian-6.12")]
    distro: host_recipe::DebianKernel,
}

#[derive(Args)]
struct SoakArgs {
    /// How many times to run the scenario.
    #[arg(long, value_name = "N", default_value = "10")]
    runs: u32,
    /// Where to write the summary (default: build/runs/soak-<scenario>-<pid>.yaml).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The scenario and its options, as you would type them after `labctl`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SCENARIO [OPTIONS]"
    )]
    command: Vec<String>,
}

/// Memory of the Debian guest unless --memory says otherwise, and what L1 then needs.
const DEBIAN_MEMORY_MIB: u32 = 1024;
const DEBIAN_L1_MEMORY_MIB: u32 = 1792;

#[derive(Args)]
struct ExecArgs {
    #[command(flatten)]
    lab: LabArgs,
    /// A host file to copy into L2's working directory (name and mode kept). Repeatable.
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// The command to run in L2 (relative paths are in the working directory).
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

/// `--baseline`: an unpatched bzImage that must exist.
fn check_baseline(f: Option<&Path>) -> anyhow::Result<()> {
    match f {
        Some(f) if !f.is_file() => Err(error::setup(format!(
            "--baseline {}: no such file",
            f.display()
        ))),
        _ => Ok(()),
    }
}

fn lab_from(cli_config: Option<PathBuf>, repo: Option<PathBuf>, a: LabArgs) -> anyhow::Result<Lab> {
    let vcpus = a.vcpus;
    let a = a.common;
    let repo = repo.unwrap_or_else(scenario::default_repo);
    let file = match cli_config {
        Some(p) => FileConfig::load(&p)?,
        None if std::path::Path::new("lab.yaml").is_file() => {
            FileConfig::load(std::path::Path::new("lab.yaml"))?
        }
        None => FileConfig::default(),
    };
    if a.l1_image.is_some() && a.kernel.is_none() {
        return Err(error::setup(
            "--l1-image needs --kernel: the image contains L2's kernel, L1 boots the one given",
        ));
    }
    let cfg = LabConfig::resolve(
        file,
        Overrides {
            accel: a.accel,
            timeout: a.timeout,
            kernel_series: a.kernel_series,
            kernel_src: a.kernel_src,
            build_dir: a.build_dir,
            l1_vcpus: a.l1_vcpus,
            l1_memory_mib: a.l1_memory,
            vcpus,
            memory_mib: a.memory,
        },
        &repo,
    )?;
    for p in [&a.kernel, &a.selftest, &a.l1_image].into_iter().flatten() {
        if !p.is_file() {
            return Err(error::setup(format!("{}: no such file", p.display())));
        }
    }
    let lock = std::sync::Arc::new(lock::BuildLock::acquire(&cfg.build_dir)?);
    Ok(Lab {
        lock,
        cfg,
        repo,
        artifacts: Artifacts {
            kernel: a.kernel,
            selftest: a.selftest,
            guest_dir: a.guest_dir,
            l1_image: a.l1_image,
        },
        l1_cmdline: a.l1_cmdline,
    })
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Soak(a) => {
            let mut global = Vec::new();
            if let Some(c) = cli.config {
                global.extend(["--config".into(), c.display().to_string()]);
            }
            if let Some(r) = cli.repo {
                global.extend(["--repo".into(), r.display().to_string()]);
            }
            soak::soak(
                &xshell::Shell::new()?,
                &soak::SoakRequest {
                    runs: a.runs,
                    command: a.command,
                    global,
                    out: a.out,
                },
            )
        }
        Command::Doctor => Ok(if doctor::report() {
            0
        } else {
            code::SETUP.into()
        }),
        Command::Build(a) => {
            let lab = lab_from(cli.config, cli.repo, a)?;
            let p = lab.build()?;
            println!("kernel: {}", p.kernel.display());
            println!("image:  {}", p.image.display());
            if let Some(b) = p.build {
                println!(
                    "info:   {}",
                    kernel::KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series)
                        .info()
                        .display()
                );
                println!(
                    "Linux {} + {} patches from {}",
                    b.version,
                    b.patches.len(),
                    b.source
                );
            }
            Ok(0)
        }
        Command::KernelCheck(a) => {
            let lab = lab_from(cli.config, cli.repo, a)?;
            lab.build()?;
            let dirs = kernel::KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series);
            let patches = kernel::lab_kernel_patches(&lab.repo, lab.cfg.kernel_series)?;
            let results = kernel::quality_gate(&xshell::Shell::new()?, &dirs, &patches)?;
            for r in &results {
                println!("{} {}", if r.ok { "ok  " } else { "FAIL" }, r.name);
                if !r.ok {
                    println!("{}", r.detail);
                }
            }
            Ok(if results.iter().all(|r| r.ok) {
                0
            } else {
                code::SCENARIO_FAILED.into()
            })
        }
        Command::Lab(a) => scenario::lab(&lab_from(cli.config, cli.repo, a)?),
        Command::HostRecipe(h) => {
            host_recipe::run(&lab_from(cli.config, cli.repo, h.lab)?, h.distro)
        }
        Command::KvmSelftests(k) => {
            check_baseline(k.baseline.as_deref())?;
            let lab = lab_from(cli.config, cli.repo, k.common.into())?;
            kvm_selftests::run(&lab, &k.tests, k.baseline.as_deref())
        }
        Command::Selftest(a) => scenario::selftest(&lab_from(cli.config, cli.repo, a)?),
        Command::ComparePaging(a) => paging::run(&lab_from(cli.config, cli.repo, a)?),
        Command::Stress(st) => {
            let lab = lab_from(
                cli.config,
                cli.repo,
                LabArgs {
                    common: st.common,
                    vcpus: st.vcpus.0.first().copied(),
                },
            )?;
            scenario::stress(
                &lab,
                &scenario::StressRequest {
                    sweep: st.vcpus.0,
                    threads: st.threads,
                    iterations: st.iterations,
                    leaf: st.leaf,
                    subleaf: st.subleaf,
                },
            )
        }
        Command::Bench(BenchCommand::ExitCost(b)) => {
            check_baseline(b.baseline.as_deref())?;
            let lab = lab_from(cli.config, cli.repo, b.common.into())?;
            bench::exit_cost(
                &lab,
                &bench::ExitCostRequest {
                    count: b.count,
                    repeats: b.repeats,
                    baseline: b.baseline,
                    no_baseline: b.no_baseline,
                    wide_vcpus: b.wide_vcpus,
                    lab_kernel: b.lab_kernel,
                },
            )
        }
        Command::Bench(BenchCommand::Scaling(b)) => {
            let lab = lab_from(cli.config, cli.repo, b.common.into())?;
            bench::scaling(&lab, &b.vcpus.0, b.iterations, b.repeats)
        }
        Command::Bench(BenchCommand::Turnaround(a)) => {
            let req = turnaround::TurnaroundRequest {
                runs: a.runs,
                stress_runs: a.stress_runs,
                cold: a.cold,
            };
            req.validate()?;
            turnaround::turnaround(&lab_from(cli.config, cli.repo, a.common.into())?, &req)
        }
        Command::Exec(e) => {
            let lab = lab_from(cli.config, cli.repo, e.lab)?;
            scenario::exec(&lab, &e.files, &e.argv)
        }
        Command::RecordBoot(mut r) => {
            if r.guest == record::Guest::Debian && r.lab.common.memory.is_none() {
                r.lab.common.memory = Some(DEBIAN_MEMORY_MIB);
                r.lab.common.l1_memory = r.lab.common.l1_memory.or(Some(DEBIAN_L1_MEMORY_MIB));
            }
            let lab = lab_from(cli.config, cli.repo, r.lab)?;
            record::record_boot(
                &lab,
                &record::RecordRequest {
                    guest: r.guest,
                    interval_ms: r.interval,
                    idle_s: r.idle,
                    out: r.out,
                },
            )
        }
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
