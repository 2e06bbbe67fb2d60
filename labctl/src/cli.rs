//! The command line's shared pieces: the global options, the options every scenario
//! takes (`CommonArgs`, `LabArgs`), and how they become a [`Lab`] (config file under
//! command-line overrides). Each scenario's own options live in its file under
//! `scenarios/`.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Args;
use xshell::Shell;

use crate::config::{self, AccelChoice, FileConfig, LabConfig, Overrides};
use crate::engine::{self, Lab};
use crate::error;
use crate::images::Artifacts;
use crate::lock;
use crate::series;

/// What every subcommand gets: `--config` and `--repo`, and the command's one
/// `xshell::Shell`, made in `main` and passed down (every external command labctl runs
/// goes through it).
pub struct Global {
    pub config: Option<PathBuf>,
    pub repo: Option<PathBuf>,
    pub sh: Rc<Shell>,
}

#[derive(Args, Clone, Default)]
pub struct CommonArgs {
    /// How to run L1: hardware KVM (checked to work and to nest), TCG, or auto.
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// Seconds the whole run may take before the VMs are killed.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Memory of the L2 test VM (MiB, or with M/G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_memory)]
    pub memory: Option<u32>,
    /// vCPUs of L1 (default: 1 under TCG, where L1 vCPUs running at once crash nested
    /// guests now and then, see docs/measurements.md, "Reliability"; 2-4 on hardware KVM).
    #[arg(long, value_name = "N")]
    pub l1_vcpus: Option<u32>,
    /// Memory of L1 (MiB, or with M/G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_memory)]
    pub l1_memory: Option<u32>,
    /// The Linux version to build the lab's kernel from: its port of the patch series
    /// (kernel/<version>/) and its source (default: 6.12, or lab.yaml's kernel_series).
    #[arg(long, value_enum, value_name = "VERSION")]
    pub kernel_series: Option<series::KernelSeries>,
    /// Kernel source: a tree or tarball of the series' version (default:
    /// /usr/src/linux-source-<version>.tar.*, e.g. linux-source-6.12).
    #[arg(long, value_name = "DIR|TARBALL")]
    pub kernel_src: Option<PathBuf>,
    /// Where builds, images and run logs go (default: <repo>/build).
    #[arg(long, value_name = "DIR")]
    pub build_dir: Option<PathBuf>,
    /// Prebuilt patched bzImage (with --selftest: skips the kernel build).
    #[arg(long, value_name = "FILE", env = "LABCTL_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Prebuilt exit_stats_test selftest binary.
    #[arg(long, value_name = "FILE", env = "LABCTL_SELFTEST")]
    pub selftest: Option<PathBuf>,
    /// Directory with prebuilt static guest programs (lab-init, test_assignment2).
    #[arg(long, value_name = "DIR", env = "LABCTL_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// Prebuilt L1 base image (skips image assembly; needs --kernel).
    #[arg(long, value_name = "FILE", env = "LABCTL_L1_IMAGE")]
    pub l1_image: Option<PathBuf>,
    /// Extra kernel command line for L1, e.g. `kvm.exit_accounting=0`.
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub l1_cmdline: String,
}

#[derive(Args, Clone, Default)]
pub struct LabArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// vCPUs of the L2 test VM.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
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
pub struct VcpuList(pub Vec<u32>);

/// Parses `--vcpus 1,2,4` (or one number).
pub fn vcpu_list(s: &str) -> Result<VcpuList, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: give vCPU counts like 4 or 1,2,4"))
        })
        .collect::<Result<_, _>>()
        .map(VcpuList)
}

pub fn parse_count(s: &str) -> Result<u64, String> {
    exitlab_proto::stress::parse_u64(s)
}

pub fn parse_leaf(s: &str) -> Result<u32, String> {
    exitlab_proto::stress::parse_u32(s)
}

/// `--baseline`: an unpatched bzImage that must exist.
pub fn check_baseline(f: Option<&Path>) -> anyhow::Result<()> {
    match f {
        Some(f) if !f.is_file() => Err(error::setup(format!(
            "--baseline {}: no such file",
            f.display()
        ))),
        _ => Ok(()),
    }
}

impl Global {
    /// The lab that `a` and the global options describe: lab.yaml (or --config) under
    /// the command line's options, checked, with the build directory locked.
    pub fn lab(&self, a: LabArgs) -> anyhow::Result<Lab> {
        let vcpus = a.vcpus;
        let a = a.common;
        let repo = self.repo.clone().unwrap_or_else(engine::default_repo);
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None if Path::new("lab.yaml").is_file() => FileConfig::load(Path::new("lab.yaml"))?,
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
            sh: self.sh.clone(),
            _lock: lock,
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
}
