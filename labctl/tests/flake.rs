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

/// Runs labctl with the flake's arguments, store paths replaced by local artifacts; with
/// `path`, in a clean environment whose PATH is only that directory (as in a Nix build).
fn run_as_flake(
    args: &[String],
    subst: &[(&str, String)],
    path: Option<&Path>,
) -> std::process::Output {
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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_labctl"));
    cmd.args(&args).current_dir(repo());
    if let Some(dir) = path {
        cmd.env_clear()
            .env("PATH", dir)
            .env("HOME", "/homeless-shelter");
    }
    let out = cmd.output().unwrap();
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
    // The lab image's recipe (runCommand) has labctl, QEMU and glibc's tools, and stdenv.
    let (packages, aliases) = recipe_packages(&["qemu", "glibc.bin"]);
    let farm = tmp.join("lab-image-bin");
    path_farm(&farm, &packages, &aliases);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_labctl"), farm.join("labctl")).unwrap();
    let o = run_as_flake(&image_build, &subst, Some(&farm));
    assert!(o.status.success(), "the flake's lab-image command failed");
    assert!(image_out.join("images/l1-base.cpio").is_file());

    let o = run_as_flake(&lab_app, &subst, None);
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

// ---------------------------------------------------------------------------------------
// The kernel recipe, run the way a Nix sandbox would run it, without Nix.
// ---------------------------------------------------------------------------------------

/// nixpkgs input -> the Debian packages with the same programs.
type InputMap = std::collections::BTreeMap<String, Vec<String>>;
/// (name, program): a program nixpkgs provides under another name too.
type Aliases = Vec<(String, String)>;

/// nix/debian-inputs.txt: nixpkgs input -> Debian packages, and the aliases.
fn debian_inputs() -> (InputMap, Aliases) {
    let text = std::fs::read_to_string(repo().join("nix/debian-inputs.txt")).unwrap();
    let mut map = std::collections::BTreeMap::new();
    let mut aliases = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut w = line.split_whitespace();
        let key = w.next().unwrap().to_string();
        let rest: Vec<String> = w.map(String::from).collect();
        if key == "alias" {
            for a in rest {
                let (name, target) = a.split_once('=').expect("alias NAME=PROGRAM");
                aliases.push((name.to_string(), target.to_string()));
            }
        } else {
            map.insert(key, rest);
        }
    }
    (map, aliases)
}

/// The Debian packages whose programs a recipe with these nixpkgs inputs may run (stdenv's
/// and the inputs'), and the aliases.
fn recipe_packages(inputs: &[&str]) -> (Vec<String>, Aliases) {
    let (map, aliases) = debian_inputs();
    let mut packages = map["stdenv"].clone();
    for input in inputs {
        let debs = map.get(*input).unwrap_or_else(|| {
            panic!("flake.nix has the input {input}, which nix/debian-inputs.txt does not map")
        });
        packages.extend(debs.iter().cloned());
    }
    (packages, aliases)
}

/// The kernel derivation's `nativeBuildInputs = with pkgs; [ ... ];`, as written.
fn kernel_native_inputs() -> Vec<String> {
    let f = flake();
    let kernel = &f[f
        .find("kernel = pkgs.stdenv.mkDerivation")
        .expect("the kernel derivation")..];
    let line = kernel
        .lines()
        .find(|l| l.trim_start().starts_with("nativeBuildInputs"))
        .expect("the kernel's nativeBuildInputs");
    let list = line
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .expect("a one-line list")
        .0;
    list.split_whitespace().map(String::from).collect()
}

/// A directory of links to the programs (in /usr/bin, /bin, /usr/sbin, /sbin) that the
/// packages provide, plus the aliases; nothing else.
fn path_farm(dir: &Path, packages: &[String], aliases: &[(String, String)]) {
    std::fs::create_dir_all(dir).unwrap();
    for p in packages {
        let out = Command::new("dpkg").args(["-L", p]).output().unwrap();
        assert!(
            out.status.success(),
            "package {p} (nix/debian-inputs.txt) is not installed: run scripts/install-deps"
        );
        for file in String::from_utf8_lossy(&out.stdout).lines() {
            let f = Path::new(file);
            let bin_dir = f.parent().and_then(Path::to_str);
            if !matches!(bin_dir, Some("/usr/bin" | "/bin" | "/usr/sbin" | "/sbin")) {
                continue;
            }
            let link = dir.join(f.file_name().unwrap());
            if f.exists() && !link.exists() {
                std::os::unix::fs::symlink(f, &link).unwrap();
            }
        }
    }
    for (name, target) in aliases {
        let t = dir.join(target);
        if t.exists() && !dir.join(name).exists() {
            std::os::unix::fs::symlink(std::fs::read_link(&t).unwrap(), dir.join(name)).unwrap();
        }
    }
}

/// Unpacks the kernel source into `scratch/src` and runs the flake's kernel recipe there
/// (patches, then nix/kernel/*.sh) with PATH made only of the programs its inputs
/// provide, minus `without`; no network, no HOME, a clean environment.
fn run_kernel_recipe(scratch: &Path, without: &[&str]) -> std::process::Output {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch.join("tmp")).unwrap();
    let tarball = std::fs::read_dir("/usr/src")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("linux-source-6.12.tar")
        })
        .expect("no /usr/src/linux-source-6.12.tar.*: run scripts/install-deps");
    let src = scratch.join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Unpacking is Nix's job (unpackPhase), done here with the host's tools.
    let untar = Command::new("tar")
        .args(["-xf"])
        .arg(&tarball)
        .args(["--strip-components=1", "-C"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(untar.success(), "unpacking {}", tarball.display());

    let inputs = kernel_native_inputs();
    let (mut packages, aliases) =
        recipe_packages(&inputs.iter().map(String::as_str).collect::<Vec<_>>());
    packages.retain(|p| !without.contains(&p.as_str()));
    let farm = scratch.join("bin");
    path_farm(&farm, &packages, &aliases);

    // The patches in the order the flake lists them: kernel/6.12/patches, then kernel/6.12/lab-patches.
    let mut patches = Vec::new();
    for dir in ["kernel/6.12/patches", "kernel/6.12/lab-patches"] {
        let mut p: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "patch"))
            .collect();
        p.sort();
        patches.extend(p);
    }
    let phase = |name: &str| repo().join("nix/kernel").join(name);
    // stdenv's helpers the phases call: hooks (none here) and patchShebangs (Debian's
    // /usr/bin/env is where the scripts' shebangs look; a Nix sandbox has none).
    let mut script =
        String::from("set -euo pipefail\nrunHook() { :; }\npatchShebangs() { :; }\ncd src\n");
    for p in &patches {
        script += &format!("patch -p1 --batch < '{}'\n", p.display());
    }
    for name in ["post-patch.sh", "configure.sh", "build.sh", "install.sh"] {
        script += &format!(
            "echo '[recipe] {name}'\nsource '{}'\n",
            phase(name).display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Command::new("unshare")
        .args(["--net", "--", "/usr/bin/env", "-i"])
        .arg(format!("PATH={}", farm.display()))
        .arg("HOME=/homeless-shelter")
        .arg(format!("TMPDIR={}", scratch.join("tmp").display()))
        .arg(format!("NIX_BUILD_CORES={cores}"))
        .arg(format!("out={}", scratch.join("out").display()))
        .arg(format!(
            "labConfig={}",
            repo().join("kernel/lab.config").display()
        ))
        .args(["/bin/bash", "-c", &script])
        .current_dir(scratch)
        .output()
        .expect("running unshare (util-linux) as root")
}

fn tail(o: &std::process::Output) -> String {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn the_kernel_recipe_builds_with_only_its_declared_inputs() {
    let scratch = repo().join("build/flake-recipe/kernel");
    let o = run_kernel_recipe(&scratch, &[]);
    assert!(
        o.status.success(),
        "the kernel recipe failed:\n{}",
        tail(&o)
    );
    let out = scratch.join("out");
    assert!(std::fs::metadata(out.join("bzImage")).unwrap().len() > 500_000);
    assert!(
        std::fs::metadata(out.join("exit_stats_test"))
            .unwrap()
            .len()
            > 10_000
    );
    let config = std::fs::read_to_string(out.join("config")).unwrap();
    for opt in ["CONFIG_KVM_AMD=y", "CONFIG_KVM_INTEL=y"] {
        assert!(
            config.lines().any(|l| l == opt),
            "{opt} not in the recipe's config"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The test above would catch an undeclared input: without rsync (the input the flake
/// lacked before), the same recipe stops at `make headers_install`.
#[test]
fn the_kernel_recipe_fails_without_a_declared_input() {
    let scratch = repo().join("build/flake-recipe/kernel-without-rsync");
    let o = run_kernel_recipe(&scratch, &["rsync"]);
    let text = tail(&o);
    assert!(
        !o.status.success(),
        "the recipe built without rsync:\n{text}"
    );
    assert!(
        text.contains("rsync: not found") || text.contains("rsync: command not found"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `nix-instantiate --eval --strict` of nix/eval-check.nix: the flake's outputs applied to
/// a nixpkgs stand-in that has only the attributes (and takes only the arguments) the
/// flake may use.
fn eval_flake(flake: &Path) -> std::process::Output {
    Command::new("nix-instantiate")
        .args([
            "--eval",
            "--strict",
            "--json",
            "nix/eval-check.nix",
            "--arg",
            "flake",
        ])
        .arg(flake)
        .current_dir(repo())
        .output()
        .expect("this test needs nix-instantiate: apt-get install -y nix-bin")
}

#[test]
fn the_flake_evaluates_against_a_nixpkgs_stand_in() {
    let o = eval_flake(&repo().join("flake.nix"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["packages"],
        serde_json::json!(["default", "guest-image", "kernel", "lab-image", "labctl"])
    );
    assert_eq!(v["apps"], serde_json::json!(["default", "lab"]));
    assert_eq!(v["checks"], serde_json::json!(["unit-tests"]));
    assert!(v["program"]
        .as_str()
        .unwrap()
        .ends_with("/bin/kvm-exit-lab"));
    // The kernel's phases are the files the recipe test runs, and its inputs the ones it
    // maps; its patches the series then the lab's, in order.
    let k = &v["kernel"];
    for (attr, file) in [
        ("postPatch", "post-patch.sh"),
        ("configurePhase", "configure.sh"),
        ("buildPhase", "build.sh"),
        ("installPhase", "install.sh"),
    ] {
        let text = std::fs::read_to_string(repo().join("nix/kernel").join(file)).unwrap();
        assert_eq!(k[attr].as_str(), Some(text.as_str()), "{attr}");
    }
    let inputs: Vec<String> = serde_json::from_value(k["inputs"].clone()).unwrap();
    assert_eq!(inputs, kernel_native_inputs());
    let patches: Vec<String> = serde_json::from_value(k["patches"].clone()).unwrap();
    let names: Vec<&str> = patches
        .iter()
        .map(|p| p.rsplit('/').next().unwrap())
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    assert!(
        names[0].starts_with("0001-KVM-x86-Don-t-leave"),
        "{names:?}"
    );
    assert!(names[6].starts_with("0001-KVM-SVM"), "{names:?}");
}

/// The evaluation check catches what parsing does not: an attribute nixpkgs lacks, an
/// argument a nixpkgs function does not take.
#[test]
fn the_evaluation_check_fails_a_misspelled_attribute_or_argument() {
    let f = flake();
    for (from, to, says) in [
        ("pkgs.linux_6_12", "pkgs.linux_6_21", "linux_6_21"),
        (
            "        nativeBuildInputs = with pkgs; [ bc",
            "        nativeBuildInput = with pkgs; [ bc",
            "nativeBuildInput",
        ),
    ] {
        assert!(f.contains(from), "{from}");
        // Next to flake.nix, so that its relative paths resolve.
        let mutant = repo().join(format!("flake-eval-mutant-{}.nix", std::process::id()));
        std::fs::write(&mutant, f.replacen(from, to, 1)).unwrap();
        let o = eval_flake(&mutant);
        let _ = std::fs::remove_file(&mutant);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{to}: evaluated");
        assert!(err.contains(says), "{to}: {err}");
    }
}
