//! What the lab needs from the host, what is missing, and the command that installs it.

use std::path::{Path, PathBuf};

use crate::error::setup;
use crate::series::KernelSeries;

/// Where QEMU's x86 firmware lives on Debian/Ubuntu (QEMU searches these itself; the copy
/// inside L1 does not, so labctl gathers the files into one `-L` directory).
pub const FIRMWARE_SEARCH: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Executable(&'static str),
    File(&'static str),
    Firmware(&'static str),
    /// The distribution's source tarball of a kernel series (`/usr/src/linux-source-6.12.tar.*`).
    KernelSource(KernelSeries),
}

pub struct Requirement {
    pub need: Need,
    /// The Debian package that provides it; `-` for what apt does not install (Rust).
    pub package: &'static str,
    pub why: &'static str,
}

/// The one list of what the lab needs: `scripts/install-deps` installs its packages, and
/// `labctl doctor` checks every need in it.
pub const DEPS_LIST: &str = include_str!("../../scripts/deps.list");

/// One line of `scripts/deps.list`: `package need why...`.
fn parse_requirement(line: &'static str) -> Result<Requirement, String> {
    let mut rest = line.trim();
    let mut word = || {
        let w = rest.split_whitespace().next().unwrap_or("");
        rest = rest[w.len()..].trim_start();
        w
    };
    let (package, need) = (word(), word());
    let need = match need.split_once(':') {
        Some(("exe", n)) if !n.is_empty() => Need::Executable(n),
        Some(("file", f)) if f.starts_with('/') => Need::File(f),
        Some(("firmware", n)) if !n.is_empty() => Need::Firmware(n),
        Some(("kernel-source", v)) => Need::KernelSource(
            KernelSeries::from_name(v)
                .ok_or_else(|| format!("{line:?}: no kernel series {v:?}"))?,
        ),
        _ => return Err(format!("{line:?}: unknown need {need:?}")),
    };
    if rest.is_empty() {
        return Err(format!("{line:?}: says not why"));
    }
    Ok(Requirement {
        need,
        package,
        why: rest,
    })
}

pub fn parse_requirements(text: &'static str) -> Result<Vec<Requirement>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(parse_requirement)
        .collect()
}

pub static REQUIREMENTS: std::sync::LazyLock<Vec<Requirement>> = std::sync::LazyLock::new(|| {
    parse_requirements(DEPS_LIST).expect("scripts/deps.list is checked by a unit test")
});

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

pub fn present(need: Need) -> Option<PathBuf> {
    match need {
        Need::Executable(n) => which(n),
        Need::File(f) => Path::new(f).is_file().then(|| PathBuf::from(f)),
        Need::Firmware(n) => find_firmware(n),
        Need::KernelSource(series) => series.default_source(),
    }
}

fn describe(need: Need) -> String {
    match need {
        Need::Executable(n) => n.to_string(),
        Need::File(f) => f.to_string(),
        Need::Firmware(n) => format!("QEMU firmware {n}"),
        Need::KernelSource(series) => series.default_source_glob(),
    }
}

/// What to type to get `missing` (requirements): apt for packages, rustup for Rust.
fn install_advice(missing: &[&Requirement]) -> String {
    let mut packages: Vec<&str> = Vec::new();
    for r in missing {
        if r.package != "-" && !packages.contains(&r.package) {
            packages.push(r.package);
        }
    }
    let mut advice = Vec::new();
    if !packages.is_empty() {
        let sudo = if nix::unistd::geteuid().is_root() {
            ""
        } else {
            "sudo "
        };
        advice.push(format!("{sudo}apt-get install -y {}", packages.join(" ")));
    }
    if missing.iter().any(|r| r.package == "-") {
        advice.push("Rust 1.85 or newer from rustup (https://rustup.rs)".into());
    }
    advice.join("\n  and: ")
}

/// Fails with the install command if any of `needs` is missing. A need that
/// scripts/deps.list does not name is still checked, and the error says the list lacks it.
pub fn require(needs: &[Need]) -> anyhow::Result<()> {
    let mut missing: Vec<&Requirement> = Vec::new();
    let mut unlisted: Vec<String> = Vec::new();
    for need in needs.iter().filter(|n| present(**n).is_none()) {
        match REQUIREMENTS.iter().find(|r| r.need == *need) {
            Some(r) => missing.push(r),
            None => unlisted.push(describe(*need)),
        }
    }
    if missing.is_empty() && unlisted.is_empty() {
        return Ok(());
    }
    let mut what: Vec<String> = missing
        .iter()
        .map(|r| format!("{} (package {})", describe(r.need), r.package))
        .collect();
    what.extend(unlisted.iter().map(|n| {
        format!("{n} (not in scripts/deps.list: a bug in kvm-exit-lab, please report it)")
    }));
    Err(setup(format!(
        "missing: {}\n  install with: {}\n  (`labctl doctor` lists everything the lab needs; scripts/install-deps installs it)",
        what.join(", "),
        if missing.is_empty() {
            "the package that provides it".to_string()
        } else {
            install_advice(&missing)
        }
    )))
}

/// `labctl doctor`: prints every requirement; returns whether all are present.
pub fn report() -> bool {
    let mut missing = Vec::new();
    println!("{:<32} {:<8} {:<20} why", "needs", "status", "package");
    for r in REQUIREMENTS.iter() {
        let found = present(r.need);
        println!(
            "{:<32} {:<8} {:<20} {}{}",
            describe(r.need),
            if found.is_some() { "ok" } else { "MISSING" },
            r.package,
            r.why,
            found
                .as_ref()
                .map(|p| format!(" [{}]", p.display()))
                .unwrap_or_default()
        );
        if found.is_none() {
            missing.push(r);
        }
    }
    println!("\nkernel series (--kernel-series):");
    for k in KernelSeries::ALL {
        let i = k.info();
        println!(
            "  {:<5} {:<11} source {:<36} {}{}",
            i.name,
            i.dir,
            k.default_source().map_or_else(
                || format!("MISSING {}", k.default_source_glob()),
                |p| p.display().to_string()
            ),
            i.nixpkgs_attr.map_or_else(
                || "not in flake.nix".to_string(),
                |a| format!("flake.nix: nixpkgs {a}")
            ),
            if k == KernelSeries::default() {
                " (default)"
            } else {
                ""
            }
        );
    }
    if missing.is_empty() {
        println!("\nEverything the lab needs is present.");
        true
    } else {
        println!(
            "\nInstall what is missing with:\n  {}\n(or run scripts/install-deps)",
            install_advice(&missing)
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deps_list_parses_and_names_what_the_build_runs() {
        let reqs = parse_requirements(DEPS_LIST).unwrap();
        let exes: Vec<&str> = reqs
            .iter()
            .filter_map(|r| match r.need {
                Need::Executable(n) => Some(n),
                _ => None,
            })
            .collect();
        // Every program the build and the boots run (make headers_install runs rsync).
        for exe in [
            "qemu-system-x86_64",
            "make",
            "gcc",
            "flex",
            "bison",
            "bc",
            "perl",
            "rsync",
            "patch",
            "tar",
            "xz",
            "gzip",
            "ldd",
            "cargo",
        ] {
            assert!(exes.contains(&exe), "{exe} missing from scripts/deps.list");
        }
        for series in KernelSeries::ALL {
            assert!(
                reqs.iter().any(|r| r.need == Need::KernelSource(series)
                    && r.package == series.info().source_package),
                "{series}"
            );
        }
        assert!(reqs
            .iter()
            .all(|r| !r.package.is_empty() && !r.why.is_empty()));
    }

    #[test]
    fn a_need_the_list_does_not_name_is_still_checked() {
        let e = require(&[Need::Executable("surely-not-a-program-xyz")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in scripts/deps.list"), "{e}");
        assert!(require(&[Need::Executable("sh")]).is_ok());
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(parse_requirements("pkg exe:x\n").is_err());
        assert!(parse_requirements("pkg thing:x why\n").is_err());
        assert!(parse_requirements("pkg file:relative why\n").is_err());
        let r = parse_requirements("# c\n\npkg exe:x does  it\n").unwrap();
        assert_eq!(
            (r[0].package, r[0].need, r[0].why),
            ("pkg", Need::Executable("x"), "does  it")
        );
    }
}
