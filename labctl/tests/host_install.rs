//! scripts/host-install without a boot: the README's recipe is the script's own steps,
//! and what a student can get wrong fails with the script's message, before anything is
//! built or unloaded. (`labctl host-recipe`, in tests/lab.rs, runs it in the lab.)

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository (tests/common has the boot helpers, which these tests do not need).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

const RELEASE: &str = "6.12.117+deb12-amd64";

fn host_install(args: &[&str], path: Option<&Path>) -> Output {
    let mut c = Command::new("sh");
    c.arg("scripts/host-install").args(args).current_dir(repo());
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let out = c.output().expect("running sh");
    eprintln!(
        "$ scripts/host-install {}\n--- stdout\n{}--- stderr\n{}--- status {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("host-install-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The README's block is exactly what `--dry-run` prints for the kernel it names.
#[test]
fn the_readmes_recipe_is_the_scripts_dry_run() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let begin = "<!-- host-install dry-run: begin -->\n```text\n";
    let end = "```\n<!-- host-install dry-run: end -->";
    let i = readme.find(begin).expect("README has the dry-run block") + begin.len();
    let block = &readme[i..i + readme[i..].find(end).expect("the block ends")];
    let mut printed = String::new();
    for args in [
        vec!["--dry-run", "build", "--release", RELEASE],
        vec!["--dry-run", "load", "--release", RELEASE, "--vendor", "amd"],
    ] {
        let o = host_install(&args, None);
        assert!(o.status.success(), "{}", stderr(&o));
        printed.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    assert_eq!(
        block, printed,
        "README.md's recipe differs from the script's --dry-run: regenerate the block"
    );
    // Every patch of the series is applied, in order.
    let patches: Vec<String> = std::fs::read_dir(repo().join("kernel/6.12/patches"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".patch"))
        .collect();
    assert!(patches.len() >= 5, "{patches:?}");
    for p in &patches {
        assert!(
            block.contains(p.as_str()),
            "{p} is not applied by the recipe"
        );
    }
    for step in [
        "LOCALVERSION=+deb12-amd64 modules_prepare",
        "M=arch/x86/kvm",
        "modprobe -r kvm_amd kvm",
        "insmod ./kvm-exit-lab-build/linux-source-6.12/arch/x86/kvm/kvm.ko exit_stats_leaves=1",
    ] {
        assert!(block.contains(step), "no step {step:?}");
    }
}

#[test]
fn bad_arguments_say_what_to_give() {
    let cases: [(&[&str], i32, &str); 7] = [
        (&[], 2, "usage: host-install"),
        (
            &["frobnicate"],
            1,
            "unknown command 'frobnicate' (build, load or restore)",
        ),
        (
            &["build", "--colour", "red"],
            1,
            "unknown option '--colour'",
        ),
        (&["build", "--release"], 1, "--release needs a value"),
        (&["build", "--jobs", "many"], 1, "--jobs wants a number"),
        (
            &["load", "--vendor", "arm"],
            1,
            "--vendor must be amd or intel, not 'arm'",
        ),
        (
            &["build", "--release", "banana"],
            1,
            "cannot read a kernel version from the release 'banana'",
        ),
    ];
    for (args, code, msg) in cases {
        let o = host_install(args, None);
        assert_eq!(o.status.code(), Some(code), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    let o = host_install(&["--help"], None);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("restore  (root)"));
}

/// A source of another version than the kernel: refused from its Makefile, before
/// anything is unpacked or built.
#[test]
fn a_source_of_another_version_is_refused_before_the_build() {
    let d = scratch("mismatch");
    let work = d.join("work");
    let o = build_in(&d, "6.1.0-43-amd64", "CONFIG_KVM=m\n", None);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("is Linux 6.12."), "{e}");
    assert!(e.contains("but the kernel 6.1.0-43-amd64 is 6.1.0"), "{e}");
    assert!(e.contains("Nothing was built"), "{e}");
    assert!(!work.exists(), "the build started anyway");
    std::fs::remove_dir_all(d).unwrap();
}

/// A kernel with BTF and no pahole: olddefconfig would drop BTF and the modules' struct
/// module would not be the kernel's (the lab measured "Invalid relocation target").
/// Debian's 6.1 kernels are Linux 6.1.N released as 6.1.0-ABI-amd64: the version the
/// source must have is the one in the kernel's headers (include/config/kernel.release).
#[test]
fn a_debian_61_kernel_is_checked_against_its_headers_version() {
    let source = PathBuf::from("/usr/src/linux-source-6.1.tar.xz");
    assert!(
        source.is_file(),
        "{} is missing: scripts/install-deps installs linux-source-6.1",
        source.display()
    );
    let d = scratch("deb61");
    let headers = d.join("linux-headers-6.1.0-54-amd64");
    std::fs::create_dir_all(headers.join("include/config")).unwrap();
    std::fs::write(headers.join("include/config/kernel.release"), "6.1.190\n").unwrap();
    std::fs::write(headers.join("Module.symvers"), "").unwrap();
    std::fs::write(d.join("config"), "CONFIG_KVM=m\n").unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "build".to_string(),
        "--release".into(),
        "6.1.0-54-amd64".into(),
        "--source".into(),
        arg(&source),
        "--config".into(),
        arg(&d.join("config")),
        "--symvers".into(),
        arg(&headers.join("Module.symvers")),
        "--dir".into(),
        arg(&d.join("work")),
    ];
    let o = host_install(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("is Linux 6.1.192, but the kernel 6.1.0-54-amd64 is 6.1.190"),
        "{e}"
    );
    assert!(e.contains("Nothing was built"), "{e}");
    assert!(!d.join("work").exists(), "the build started anyway");
    // Its dry run applies the 6.1 port, and gives make the whole release.
    let o = host_install(
        &[
            "--dry-run",
            "build",
            "--release",
            "6.1.0-54-amd64",
            "--symvers",
            headers.join("Module.symvers").to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("is Linux 6.1.190 (its Makefile"), "{out}");
    assert!(out.contains("kernel/6.1/patches/0001-"), "{out}");
    assert!(
        out.contains("KERNELRELEASE=6.1.0-54-amd64 modules_prepare"),
        "{out}"
    );
    assert!(!out.contains("LOCALVERSION"), "{out}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_btf_kernel_without_pahole_is_refused_before_the_build() {
    let d = scratch("pahole");
    // Every program of /usr/bin but pahole.
    let farm = d.join("bin");
    std::fs::create_dir_all(&farm).unwrap();
    for e in std::fs::read_dir("/usr/bin").unwrap().flatten() {
        if e.file_name() != "pahole" {
            symlink(e.path(), farm.join(e.file_name())).unwrap();
        }
    }
    let o = build_in(
        &d,
        RELEASE,
        "CONFIG_KVM=m\nCONFIG_DEBUG_INFO_BTF=y\n",
        Some(&farm),
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("needs pahole") && e.contains("apt-get install dwarves"),
        "{e}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// `load` without a build says to build first, and as a non-root user says to use sudo.
#[test]
fn load_without_a_build_says_to_build_first() {
    let d = scratch("nobuild");
    let o = host_install(
        &["load", "--vendor", "amd", "--dir", d.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    if nix_is_root() {
        assert!(e.contains("run 'scripts/host-install build' first"), "{e}");
    } else {
        assert!(e.contains("needs root: sudo"), "{e}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `host-install build` for `release` from the installed source, with a configuration
/// of `config_text` and an empty Module.symvers, in `d/work`.
fn build_in(d: &Path, release: &str, config_text: &str, path: Option<&Path>) -> Output {
    let source = repo_source();
    let (config, symvers) = (d.join("config"), d.join("Module.symvers"));
    std::fs::write(&config, config_text).unwrap();
    std::fs::write(&symvers, "").unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "build".to_string(),
        "--release".into(),
        release.into(),
        "--source".into(),
        arg(&source),
        "--config".into(),
        arg(&config),
        "--symvers".into(),
        arg(&symvers),
        "--dir".into(),
        arg(&d.join("work")),
    ];
    host_install(&args.iter().map(String::as_str).collect::<Vec<_>>(), path)
}

/// The installed Debian kernel source (scripts/install-deps installs it).
fn repo_source() -> PathBuf {
    let p = PathBuf::from("/usr/src/linux-source-6.12.tar.xz");
    assert!(
        p.is_file(),
        "{} is missing: scripts/install-deps installs linux-source-6.12",
        p.display()
    );
    p
}
