//! What the lab needs from the host, what is missing, and the command that installs it.

use std::path::{Path, PathBuf};

use crate::error::setup;

/// Where QEMU's x86 firmware lives on Debian/Ubuntu (QEMU searches these itself; the copy
/// inside L1 does not, so labctl gathers the files into one `-L` directory).
pub const FIRMWARE_SEARCH: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// The distribution's kernel source tarball (package linux-source-6.12).
pub const DEFAULT_SOURCE_DIR: &str = "/usr/src";
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Executable(&'static str),
    File(&'static str),
    Firmware(&'static str),
    KernelSource,
}

pub struct Requirement {
    pub need: Need,
    pub package: &'static str,
    pub why: &'static str,
}

pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        need: Need::Executable("qemu-system-x86_64"),
        package: "qemu-system-x86",
        why: "runs L1, and is copied into L1 to run L2",
    },
    Requirement {
        need: Need::Firmware("bios-256k.bin"),
        package: "seabios",
        why: "BIOS of L2 (-M pc)",
    },
    Requirement {
        need: Need::Firmware("linuxboot_dma.bin"),
        package: "qemu-system-data",
        why: "-kernel boot of L2",
    },
    Requirement {
        need: Need::Firmware("kvmvapic.bin"),
        package: "qemu-system-data",
        why: "KVM-accelerated -M pc",
    },
    Requirement {
        need: Need::KernelSource,
        package: SOURCE_PACKAGE,
        why: "the kernel the patches apply to",
    },
    Requirement {
        need: Need::Executable("make"),
        package: "make",
        why: "kernel build",
    },
    Requirement {
        need: Need::Executable("gcc"),
        package: "gcc",
        why: "kernel and selftest build",
    },
    Requirement {
        need: Need::Executable("flex"),
        package: "flex",
        why: "kernel build (kconfig)",
    },
    Requirement {
        need: Need::Executable("bison"),
        package: "bison",
        why: "kernel build (kconfig)",
    },
    Requirement {
        need: Need::Executable("bc"),
        package: "bc",
        why: "kernel build",
    },
    Requirement {
        need: Need::Executable("perl"),
        package: "perl",
        why: "kernel build, checkpatch.pl",
    },
    Requirement {
        need: Need::File("/usr/include/libelf.h"),
        package: "libelf-dev",
        why: "objtool",
    },
    Requirement {
        need: Need::File("/usr/include/openssl/ssl.h"),
        package: "libssl-dev",
        why: "kernel build host tools",
    },
    Requirement {
        need: Need::Executable("patch"),
        package: "patch",
        why: "applying kernel/patches",
    },
    Requirement {
        need: Need::Executable("tar"),
        package: "tar",
        why: "unpacking the kernel source",
    },
    Requirement {
        need: Need::Executable("xz"),
        package: "xz-utils",
        why: "unpacking the kernel source",
    },
    Requirement {
        need: Need::Executable("ldd"),
        package: "libc-bin",
        why: "finding QEMU's libraries",
    },
    Requirement {
        need: Need::Executable("rsvg-convert"),
        package: "librsvg2-bin",
        why: "record-boot: the plot as PNG",
    },
    Requirement {
        need: Need::File("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        package: "fonts-dejavu-core",
        why: "record-boot: the plot's text",
    },
    Requirement {
        need: Need::Executable("debootstrap"),
        package: "debootstrap",
        why: "record-boot --guest debian: the Debian image",
    },
    Requirement {
        need: Need::Executable("mkfs.ext4"),
        package: "e2fsprogs",
        why: "record-boot --guest debian: the Debian disk",
    },
    Requirement {
        need: Need::Executable("cargo"),
        package: "cargo",
        why: "building the guest programs",
    },
];

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds QEMU firmware: next to the QEMU on PATH (`<prefix>/bin/..` → `<prefix>/share/qemu`,
/// as in Nix or a source install), then in the distribution's directories.
pub fn find_firmware(name: &str) -> Option<PathBuf> {
    let beside_qemu = which("qemu-system-x86_64")
        .and_then(|q| q.canonicalize().ok())
        .and_then(|q| q.parent()?.parent().map(|p| p.join("share/qemu")));
    beside_qemu
        .into_iter()
        .chain(FIRMWARE_SEARCH.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The default kernel source: the newest linux-source-6.12 tarball under /usr/src.
pub fn default_kernel_source() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(DEFAULT_SOURCE_DIR)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-6.12.tar"))
        })
        .collect();
    found.sort();
    found.pop()
}

pub fn present(need: Need) -> Option<PathBuf> {
    match need {
        Need::Executable(n) => which(n),
        Need::File(f) => Path::new(f).is_file().then(|| PathBuf::from(f)),
        Need::Firmware(n) => find_firmware(n),
        Need::KernelSource => default_kernel_source(),
    }
}

fn describe(need: Need) -> String {
    match need {
        Need::Executable(n) => n.to_string(),
        Need::File(f) => f.to_string(),
        Need::Firmware(n) => format!("QEMU firmware {n}"),
        Need::KernelSource => format!("{DEFAULT_SOURCE_DIR}/linux-source-6.12.tar.*"),
    }
}

fn install_command(packages: &[&str]) -> String {
    let sudo = if nix::unistd::geteuid().is_root() {
        ""
    } else {
        "sudo "
    };
    format!("{sudo}apt-get install -y {}", packages.join(" "))
}

/// Fails with the install command if any of `needs` is missing.
pub fn require(needs: &[Need]) -> anyhow::Result<()> {
    let missing: Vec<&Requirement> = REQUIREMENTS
        .iter()
        .filter(|r| needs.contains(&r.need) && present(r.need).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|r| r.package).collect();
    pkgs.dedup();
    let what: Vec<String> = missing
        .iter()
        .map(|r| format!("{} (package {})", describe(r.need), r.package))
        .collect();
    Err(setup(format!(
        "missing: {}\n  install with: {}\n  (`labctl doctor` lists everything the lab needs)",
        what.join(", "),
        install_command(&pkgs)
    )))
}

/// `labctl doctor`: prints every requirement; returns whether all are present.
pub fn report() -> bool {
    let mut missing = Vec::new();
    println!("{:<32} {:<8} {:<20} why", "needs", "status", "package");
    for r in REQUIREMENTS {
        let found = present(r.need);
        let status = if found.is_some() { "ok" } else { "MISSING" };
        println!(
            "{:<32} {:<8} {:<20} {}{}",
            describe(r.need),
            status,
            r.package,
            r.why,
            found
                .map(|p| format!(" [{}]", p.display()))
                .unwrap_or_default()
        );
        if status == "MISSING" && !missing.contains(&r.package) {
            missing.push(r.package);
        }
    }
    if missing.is_empty() {
        println!("\nEverything the lab needs is present.");
        true
    } else {
        println!(
            "\nInstall what is missing with:\n  {}",
            install_command(&missing)
        );
        false
    }
}
