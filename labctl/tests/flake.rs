//! What can be checked of flake.nix without Nix's binary cache or nixpkgs' sources (neither
//! is reachable from the machines this is developed and tested on): it parses, its lock pins
//! nixpkgs, and the two labctl command lines it runs (the lab-image build and `nix run
//! .#lab`) use flags that exist and work: they are run here, as written, on the artifacts
//! `labctl build` made, with Debian's QEMU instead of Nix's.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn flake() -> String {
    std::fs::read_to_string(repo().join("flake.nix")).unwrap()
}

/// The labctl command line that starts at the line containing `start`, with its
/// backslash-continued lines, as words.
fn invocation(text: &str, start: &str) -> Vec<String> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(start));
    let mut words = Vec::new();
    for l in lines.by_ref() {
        let l = l.trim();
        let cont = l.ends_with('\\');
        words.extend(
            l.trim_end_matches('\\')
                .split_whitespace()
                .map(String::from),
        );
        if !cont {
            break;
        }
    }
    assert!(!words.is_empty(), "no `{start}` in flake.nix");
    let at = words.iter().position(|w| w == "labctl").expect("labctl");
    words.split_off(at + 1)
}

#[test]
fn flake_parses() {
    let out = Command::new("nix-instantiate")
        .args(["--parse", "flake.nix"])
        .current_dir(repo())
        .output()
        .expect("this test needs nix-instantiate: apt-get install -y nix-bin");
    assert!(
        out.status.success(),
        "flake.nix does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn flake_lock_pins_nixpkgs_by_rev_and_hash() {
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("flake.lock")).unwrap())
            .expect("flake.lock is JSON");
    assert_eq!(lock["version"], 7);
    assert_eq!(lock["nodes"]["root"]["inputs"]["nixpkgs"], "nixpkgs");
    let locked = &lock["nodes"]["nixpkgs"]["locked"];
    let rev = locked["rev"].as_str().unwrap();
    assert_eq!(rev.len(), 40);
    assert!(rev.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(locked["narHash"].as_str().unwrap().starts_with("sha256-"));
    let original = &lock["nodes"]["nixpkgs"]["original"];
    let url = format!(
        "github:{}/{}/{}",
        original["owner"].as_str().unwrap(),
        original["repo"].as_str().unwrap(),
        original["ref"].as_str().unwrap()
    );
    assert!(
        flake().contains(&format!("inputs.nixpkgs.url = \"{url}\"")),
        "{url}"
    );
}

#[test]
fn flake_wires_every_output() {
    let f = flake();
    for output in [
        "packages.${system}",
        "inherit kernel labctl;",
        "guest-image = guest;",
        "lab-image = labImage;",
        "default = lab;",
        "apps.${system}",
        "lab = {",
        "default = self.apps.${system}.lab;",
        "devShells.${system}.default",
        "checks.${system}.unit-tests",
    ] {
        assert!(f.contains(output), "flake.nix lacks {output:?}");
    }
}

/// Runs labctl with the flake's arguments, store paths replaced by local artifacts.
fn run_as_flake(args: &[String], subst: &[(&str, String)]) -> std::process::Output {
    let args: Vec<String> = args
        .iter()
        .filter(|a| a.as_str() != "\"$@\"")
        .map(|a| {
            let mut a = a.trim_matches('"').to_string();
            for (from, to) in subst {
                a = a.replace(from, to);
            }
            a
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(&args)
        .current_dir(repo())
        .output()
        .unwrap();
    eprintln!(
        "$ labctl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_flakes_labctl_command_lines_work() {
    let f = flake();
    let image_build = invocation(&f, "labctl build");
    let lab_app = invocation(&f, "exec labctl lab");
    assert_eq!(image_build[0], "build");
    assert_eq!(lab_app[0], "lab");

    // The artifacts the flake's kernel and guest packages provide, built the Debian way.
    let build = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .arg("build")
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(build.success(), "labctl build failed");
    let kdir = repo().join("build/kernel");
    let tmp = std::env::temp_dir().join(format!("flake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let kernel_out = tmp.join("kernel");
    std::fs::create_dir_all(&kernel_out).unwrap();
    std::fs::copy(
        kdir.join("obj/arch/x86/boot/bzImage"),
        kernel_out.join("bzImage"),
    )
    .unwrap();
    std::fs::copy(
        kdir.join("selftests/x86_64/exit_stats_test"),
        kernel_out.join("exit_stats_test"),
    )
    .unwrap();
    let image_out = tmp.join("lab-image");
    let subst = vec![
        ("${kernel}", kernel_out.display().to_string()),
        (
            "${guest}/bin",
            repo().join("build/guest").display().to_string(),
        ),
        ("${labImage}", image_out.display().to_string()),
        ("$out", image_out.display().to_string()),
        (
            "''${XDG_CACHE_HOME:-$HOME/.cache}/kvm-exit-lab",
            tmp.join("cache").display().to_string(),
        ),
    ];
    let o = run_as_flake(&image_build, &subst);
    assert!(o.status.success(), "the flake's lab-image command failed");
    assert!(image_out.join("images/l1-base.cpio").is_file());

    let o = run_as_flake(&lab_app, &subst);
    assert_eq!(o.status.code(), Some(0), "the flake's lab app failed");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("CPUID(0x4FFFFFFF), exits="))
            .count(),
        2,
        "{out}"
    );
    assert!(
        tmp.join("cache/runs").is_dir(),
        "runs go to the cache directory"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
