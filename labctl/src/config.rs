//! Stage 1 of the pipeline, configuration: `lab.yaml` and the command line, validated.
//!
//! Every knob has one definition here; the command line overrides the file, the file
//! overrides the defaults. Unknown keys in the file are errors that name line and column.

use std::path::{Path, PathBuf};
use std::time::Duration;

use exitlab_proto::vm::Accel;
use serde::Deserialize;

use crate::error::setup;
use crate::series::KernelSeries;

/// The most vCPUs the lab gives the L2 VM.
pub const MAX_L2_VCPUS: u32 = 16;
/// The most vCPUs the lab gives L1 (each is a host thread under TCG).
pub const MAX_L1_VCPUS: u32 = 32;
pub const MIN_L2_MEMORY_MIB: u32 = 64;
pub const MIN_L1_MEMORY_MIB: u32 = 512;
pub const MAX_MEMORY_MIB: u32 = 65536;
/// L1 keeps this much for its own kernel, the unpacked image and QEMU.
pub const L1_RESERVED_MIB: u32 = 448;
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Hardware KVM if it works and exposes VMX/SVM to L1, otherwise TCG.
    Auto,
    /// Hardware KVM, or fail saying why not.
    Kvm,
    /// QEMU's software emulation, with an SVM-capable CPU model.
    Tcg,
}

/// `lab.yaml`. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub accel: Option<AccelChoice>,
    /// Seconds a whole run (boot to result) may take.
    pub timeout: Option<u64>,
    /// The Linux version whose port of the series is built: "6.12" or "6.1".
    pub kernel_series: Option<KernelSeries>,
    pub kernel_src: Option<PathBuf>,
    pub build_dir: Option<PathBuf>,
    #[serde(default)]
    pub l1: VmFileConfig,
    #[serde(default)]
    pub l2: VmFileConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFileConfig {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
}

/// Options given on the command line (all optional; see `cli.rs`).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub accel: Option<AccelChoice>,
    pub timeout: Option<u64>,
    pub kernel_series: Option<KernelSeries>,
    pub kernel_src: Option<PathBuf>,
    pub build_dir: Option<PathBuf>,
    pub l1_vcpus: Option<u32>,
    pub l1_memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
}

/// The validated configuration of one labctl invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct LabConfig {
    pub accel: AccelChoice,
    pub timeout: Duration,
    pub kernel_series: KernelSeries,
    /// None: the distribution's source tarball of the series (linux-source-6.12, ...).
    pub kernel_src: Option<PathBuf>,
    pub build_dir: PathBuf,
    /// As asked (`--l1-vcpus`, `l1.vcpus`); `None`: [`LabConfig::l1_vcpus`] decides.
    pub l1_vcpus_asked: Option<u32>,
    pub l1_memory_mib: u32,
    pub l2_vcpus: u32,
    pub l2_memory_mib: u32,
}

impl FileConfig {
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| {
            setup(format!(
                "{}: {e}\n  (keys: accel, timeout, kernel_series, kernel_src, build_dir, l1.vcpus, l1.memory_mib, l2.vcpus, l2.memory_mib; see docs/usage.md)",
                origin.display()
            ))
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| setup(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, path)
    }
}

/// L1's vCPUs when not asked: one under TCG, where L1's vCPUs running at once (one host
/// thread each) crash nested guests now and then (docs/measurements.md, "The crashes"); under hardware
/// KVM, up to four.
pub fn default_l1_vcpus(accel: Accel) -> u32 {
    match accel {
        Accel::Kvm => std::thread::available_parallelism()
            .map_or(2, |n| n.get() as u32)
            .clamp(2, 4),
        Accel::Tcg | Accel::TcgIcount => 1,
    }
}

impl LabConfig {
    /// L1's vCPUs on `accel`: as asked, else [`default_l1_vcpus`].
    pub fn l1_vcpus(&self, accel: Accel) -> u32 {
        self.l1_vcpus_asked
            .unwrap_or_else(|| default_l1_vcpus(accel))
    }

    pub fn resolve(file: FileConfig, o: Overrides, repo: &Path) -> anyhow::Result<Self> {
        let l2_vcpus = o.vcpus.or(file.l2.vcpus).unwrap_or(1);
        let l2_memory_mib = o.memory_mib.or(file.l2.memory_mib).unwrap_or(256);
        let l1_vcpus_asked = o.l1_vcpus.or(file.l1.vcpus);
        let l1_memory_mib = o
            .l1_memory_mib
            .or(file.l1.memory_mib)
            .unwrap_or_else(|| (l2_memory_mib + L1_RESERVED_MIB).max(1024));
        let timeout = o.timeout.or(file.timeout).unwrap_or(600);
        let cfg = LabConfig {
            accel: o.accel.or(file.accel).unwrap_or(AccelChoice::Auto),
            timeout: Duration::from_secs(timeout),
            kernel_series: o.kernel_series.or(file.kernel_series).unwrap_or_default(),
            kernel_src: o.kernel_src.or(file.kernel_src),
            build_dir: o
                .build_dir
                .or(file.build_dir)
                .unwrap_or_else(|| repo.join("build")),
            l1_vcpus_asked,
            l1_memory_mib,
            l2_vcpus,
            l2_memory_mib,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let t = self.timeout.as_secs();
        if t == 0 || t > MAX_TIMEOUT_SECS {
            return Err(setup(format!(
                "timeout {t} s: give a number of seconds from 1 to {MAX_TIMEOUT_SECS}"
            )));
        }
        check_range(
            "L2 vCPUs (--vcpus, l2.vcpus)",
            self.l2_vcpus,
            1,
            MAX_L2_VCPUS,
        )?;
        if let Some(n) = self.l1_vcpus_asked {
            check_range("L1 vCPUs (--l1-vcpus, l1.vcpus)", n, 1, MAX_L1_VCPUS)?;
        }
        check_range(
            "L2 memory in MiB (--memory, l2.memory_mib)",
            self.l2_memory_mib,
            MIN_L2_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        check_range(
            "L1 memory in MiB (--l1-memory, l1.memory_mib)",
            self.l1_memory_mib,
            MIN_L1_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        if self.l2_memory_mib + L1_RESERVED_MIB > self.l1_memory_mib {
            return Err(setup(format!(
                "L2 memory {} MiB does not fit in L1's {} MiB: L1 needs {L1_RESERVED_MIB} MiB for itself; raise --l1-memory to at least {} or lower --memory",
                self.l2_memory_mib,
                self.l1_memory_mib,
                self.l2_memory_mib + L1_RESERVED_MIB
            )));
        }
        Ok(())
    }
}

fn check_range(what: &str, v: u32, min: u32, max: u32) -> anyhow::Result<()> {
    if v < min || v > max {
        return Err(setup(format!(
            "{what} = {v} is out of range: the lab supports {min} to {max}"
        )));
    }
    Ok(())
}

/// Parses a memory size: plain MiB (`512`), or with a unit (`512M`, `2G`, `2GiB`).
pub fn parse_memory(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 256, 256M or 2G"))?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => n,
        "g" | "gb" | "gib" => n.saturating_mul(1024),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use M or G")),
    };
    u32::try_from(mib).map_err(|_| format!("{s:?} is absurdly large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str, o: Overrides) -> anyhow::Result<LabConfig> {
        let f = FileConfig::parse(yaml, Path::new("lab.yaml"))?;
        LabConfig::resolve(f, o, Path::new("/repo"))
    }

    #[test]
    fn defaults() {
        let c = resolve("", Overrides::default()).unwrap();
        assert_eq!(c.accel, AccelChoice::Auto);
        assert_eq!(c.l2_vcpus, 1);
        assert_eq!(c.l2_memory_mib, 256);
        assert!(c.l1_memory_mib >= 1024);
        assert_eq!(c.build_dir, PathBuf::from("/repo/build"));
        assert_eq!(c.kernel_src, None);
        // One L1 vCPU under TCG (reliability), more on hardware KVM, as asked if asked.
        assert_eq!(c.l1_vcpus(Accel::Tcg), 1);
        assert!(c.l1_vcpus(Accel::Kvm) >= 2);
        let c = resolve("l1:\n  vcpus: 3\n", Overrides::default()).unwrap();
        assert_eq!((c.l1_vcpus(Accel::Tcg), c.l1_vcpus(Accel::Kvm)), (3, 3));
        let o = Overrides {
            l1_vcpus: Some(0),
            ..Default::default()
        };
        assert!(resolve("", o).is_err());
    }

    #[test]
    fn file_then_command_line() {
        let yaml = "accel: tcg\ntimeout: 30\nl2:\n  vcpus: 2\n  memory_mib: 512\nl1:\n  memory_mib: 2048\n";
        let c = resolve(yaml, Overrides::default()).unwrap();
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(
            (c.l2_vcpus, c.l2_memory_mib, c.l1_memory_mib),
            (2, 512, 2048)
        );
        let o = Overrides {
            vcpus: Some(4),
            accel: Some(AccelChoice::Kvm),
            ..Default::default()
        };
        let c = resolve(yaml, o).unwrap();
        assert_eq!((c.l2_vcpus, c.accel), (4, AccelChoice::Kvm));
    }

    #[test]
    fn kernel_series_from_file_then_command_line() {
        assert_eq!(
            resolve("", Overrides::default()).unwrap().kernel_series,
            KernelSeries::V6_12
        );
        let c = resolve("kernel_series: \"6.1\"\n", Overrides::default()).unwrap();
        assert_eq!(c.kernel_series, KernelSeries::V6_1);
        let o = Overrides {
            kernel_series: Some(KernelSeries::V6_12),
            ..Default::default()
        };
        let c = resolve("kernel_series: \"6.1\"\n", o).unwrap();
        assert_eq!(c.kernel_series, KernelSeries::V6_12);
        let e = resolve("kernel_series: 6.1\n", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("quote it"), "{e}");
        let e = resolve("kernel_series: \"5.10\"\n", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("one of 6.12, 6.1"), "{e}");
    }

    #[test]
    fn unknown_keys_name_line_and_column() {
        let e = resolve("accel: tcg\nl2:\n  vpcus: 2\n", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vpcus"), "{e}");
        assert!(e.contains("line 3 column 3"), "{e}");
        let e = resolve("accel: fast\n", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn rejects_bad_values_with_the_limit() {
        let bad = |o: Overrides| resolve("", o).unwrap_err().to_string();
        let e = bad(Overrides {
            vcpus: Some(0),
            ..Default::default()
        });
        assert!(e.contains("1 to 16"), "{e}");
        let e = bad(Overrides {
            vcpus: Some(MAX_L2_VCPUS + 1),
            ..Default::default()
        });
        assert!(e.contains("out of range"), "{e}");
        let e = bad(Overrides {
            memory_mib: Some(1 << 20),
            ..Default::default()
        });
        assert!(e.contains("out of range"), "{e}");
        let e = bad(Overrides {
            memory_mib: Some(4096),
            l1_memory_mib: Some(2048),
            ..Default::default()
        });
        assert!(e.contains("does not fit"), "{e}");
        let e = bad(Overrides {
            timeout: Some(0),
            ..Default::default()
        });
        assert!(e.contains("timeout"), "{e}");
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256"), Ok(256));
        assert_eq!(parse_memory("256M"), Ok(256));
        assert_eq!(parse_memory("2G"), Ok(2048));
        assert_eq!(parse_memory("2GiB"), Ok(2048));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1").is_err());
        assert!(parse_memory("12T").is_err());
        assert!(parse_memory("99999999999G").is_err());
    }
}
