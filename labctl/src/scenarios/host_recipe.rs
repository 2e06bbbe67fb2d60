//! `labctl host-recipe`: the README's recipe for installing the patched KVM on one's own
//! Debian host (`scripts/host-install`), run end to end on Debian's own kernel without
//! touching this host:
//!
//! 1. **fetch**: Debian's kernel whose version is the installed `linux-source-6.12`'s (or
//!    `linux-source-6.1`'s: Debian 12's `linux-image-6.1.0-ABI-amd64` of that version),
//!    the pair a student's machine has after `apt-get install linux-source-X.Y` on the
//!    kernel it runs, its headers (`Module.symvers`) and busybox-static, with
//!    `apt-get download`, unpacked with `dpkg-deb -x`, never installed;
//! 2. **build**: `host-install build` of the series' port to that version
//!    (`kernel/6.12`, `kernel/6.1`) against the kernel's `/boot/config-*` and symbols;
//! 3. **image**: the lab's L1 files plus Debian's KVM modules and what they depend on
//!    (`depmod`ed as on a real system), Debian's kmod (modprobe, insmod), a busybox shell,
//!    the recipe and the modules it built;
//! 4. **boot**: L1 runs Debian's `vmlinuz`; its job loads the distribution's KVM as a boot
//!    does, has `host-install load` refuse while `/dev/kvm` is held, runs it, runs the
//!    lab's L2 programs on the swapped-in KVM, and `host-install restore`s;
//! 5. **verify**: each of those steps, and the lab's checks of L2's readings.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::msg::Msg;
use xshell::{cmd, Shell};

use crate::cli::{Global, LabArgs};
use crate::doctor::{self, Need};
use crate::engine::{self, Lab, ProgramRun};
use crate::error::setup;
use crate::images::{self, ImageFile};
use crate::kernel::KernelDirs;
use crate::progress::{self, Progress};
use crate::report::Body;
use crate::series::KernelSeries;
use crate::verify::Check;

/// The Debian kernels the recipe can be run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DebianKernel {
    /// Debian 12's linux-6.12 (linux-image-6.12.*+deb12-amd64), the series' own version.
    #[value(name = "debian-6.12")]
    Debian612,
    /// Debian 12's default linux-6.1 (linux-image-6.1.0-NN-amd64), with the series' 6.1 port.
    #[value(name = "debian-6.1")]
    Debian61,
}

impl DebianKernel {
    /// The series whose port the recipe builds for this kernel.
    pub fn series(self) -> KernelSeries {
        match self {
            DebianKernel::Debian612 => KernelSeries::V6_12,
            DebianKernel::Debian61 => KernelSeries::V6_1,
        }
    }
}

/// Where the recipe and its build sit inside L1, as in a student's home directory.
const L1_REPO: &str = "root/kvm-exit-lab";
const L1_BUILD: &str = "root/kvm-exit-lab-build";
/// The environment of L1's shell steps: PID 1 has no PATH.
const PATH_ENV: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
/// kmod's programs, each a copy of kmod (it acts on the name it is called by).
const KMOD_NAMES: &[&str] = &["modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod"];

/// A Debian kernel package that pairs with the installed kernel source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The Debian version both packages have, e.g. `6.12.117-1~deb12u1`.
    pub version: String,
    /// The kernel's release (`uname -r`), e.g. `6.12.117+deb12-amd64`.
    pub release: String,
}

/// The kernel release Debian gives a version of `linux-6.12` built for a stable release:
/// `6.12.117-1~deb12u1` -> `6.12.117+deb12-amd64`.
pub fn release_of(version: &str) -> Result<String, String> {
    let (upstream, rest) = version
        .split_once('-')
        .ok_or_else(|| format!("{version:?} is not a Debian kernel version (no revision)"))?;
    let deb = rest
        .split_once("~deb")
        .map(|(_, d)| d.chars().take_while(char::is_ascii_digit).collect::<String>())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            format!("{version:?} has no ~debNN suffix: only Debian 12's backported linux-6.12 packages are known here")
        })?;
    Ok(format!("{upstream}+deb{deb}-amd64"))
}

/// The Debian versions `apt-cache show` lists for a package.
pub fn parse_versions(apt_cache_show: &str) -> Vec<String> {
    apt_cache_show
        .lines()
        .filter_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
        .collect()
}

/// Debian 12's 6.1 kernels are released under an ABI number (`linux-image-6.1.0-56-amd64`,
/// version `6.1.192-2`): the release of the candidate whose versions include `version`,
/// the newest ABI first.
pub fn release_among(version: &str, candidates: &[(String, Vec<String>)]) -> Option<String> {
    let abi = |name: &str| {
        name.trim_end_matches("-amd64")
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut c: Vec<&(String, Vec<String>)> = candidates.iter().collect();
    c.sort_by_key(|(name, _)| std::cmp::Reverse(abi(name)));
    c.into_iter()
        .find(|(_, versions)| versions.iter().any(|v| v == version))
        .and_then(|(name, _)| name.strip_prefix("linux-image-").map(str::to_string))
}

fn pair(sh: &Shell, kernel: DebianKernel) -> Result<Pair> {
    let package = kernel.series().info().source_package;
    let format = "-f=${Version}";
    let version = cmd!(sh, "dpkg-query -W {format} {package}")
        .quiet()
        .ignore_stderr()
        .read()
        .map_err(|_| {
            setup(format!(
                "{package} is not installed: apt-get install {package} (scripts/install-deps does)"
            ))
        })?;
    let show = |image: &str| {
        cmd!(sh, "apt-cache show {image}")
            .quiet()
            .ignore_stderr()
            .read()
            .unwrap_or_default()
    };
    let no_image = |image: &str, versions: &[String]| {
        setup(format!(
            "Debian's archive has no {image} at {version}, the version of the installed {package} \
             (it lists {versions:?}): run `apt-get update`, or `apt-get install {package}` to get \
             the source of the newest kernel"
        ))
    };
    let release = match kernel {
        DebianKernel::Debian612 => {
            let release = release_of(&version).map_err(setup)?;
            let image = format!("linux-image-{release}");
            let versions = parse_versions(&show(&image));
            if !versions.contains(&version) {
                return Err(no_image(&image, &versions));
            }
            release
        }
        DebianKernel::Debian61 => {
            let pattern = r"^linux-image-6\.1\.0-[0-9]+-amd64$";
            let names = cmd!(sh, "apt-cache search --names-only {pattern}")
                .quiet()
                .ignore_stderr()
                .read()
                .unwrap_or_default();
            let candidates: Vec<(String, Vec<String>)> = names
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(|n| (n.to_string(), parse_versions(&show(n))))
                .collect();
            release_among(&version, &candidates).ok_or_else(|| {
                no_image(
                    "linux-image-6.1.0-*-amd64",
                    &candidates
                        .iter()
                        .flat_map(|(_, v)| v.clone())
                        .collect::<Vec<_>>(),
                )
            })?
        }
    };
    Ok(Pair { version, release })
}

/// Downloads (once) and unpacks Debian's kernel, its headers and busybox-static.
fn fetch(sh: &Shell, dir: &Path, pair: &Pair) -> Result<PathBuf> {
    let debs = dir.join("debs");
    let root = dir.join("root");
    let stamp = dir.join("unpacked");
    let (r, v) = (&pair.release, &pair.version);
    let wanted = [
        format!("linux-image-{r}={v}"),
        format!("linux-headers-{r}={v}"),
        "busybox-static".to_string(),
    ];
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.join("\n").as_str()) {
        return Ok(root);
    }
    let p = Progress::new("fetch");
    let _ = fs::remove_dir_all(&debs);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&debs)?;
    {
        let _d = sh.push_dir(&debs);
        let args = wanted.clone();
        cmd!(sh, "apt-get download -q {args...}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .map_err(|e| {
                setup(format!(
                    "apt-get download {} failed ({e}): is Debian's archive reachable (apt-get update)?",
                    wanted.join(" ")
                ))
            })?;
    }
    for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
        cmd!(sh, "dpkg-deb -x {deb} {root}").quiet().run()?;
    }
    fs::write(&stamp, wanted.join("\n"))?;
    p.done(&format!("Debian's {r} ({v}), its headers, busybox-static"));
    Ok(root)
}

/// The recipe's build: its work directory, and where in it kvm.ko, kvm-amd.ko and
/// kvm-intel.ko are (`linux-source-6.12/arch/x86/kvm`).
struct Built {
    work: PathBuf,
    kvm_dir: String,
}

/// Runs the recipe's build step.
fn build_modules(
    lab: &Lab,
    series: KernelSeries,
    dir: &Path,
    root: &Path,
    pair: &Pair,
) -> Result<Built> {
    let source = series.default_source().ok_or_else(|| {
        setup(format!(
            "no {}: apt-get install {}",
            series.default_source_glob(),
            series.info().source_package
        ))
    })?;
    let r = &pair.release;
    let work = dir.join("work");
    let log = dir.join("build.log");
    let _ = fs::remove_file(&log);
    let mut c = std::process::Command::new("sh");
    c.arg(lab.repo.join("scripts/host-install"))
        .arg("build")
        .args(["--release", r])
        .arg("--source")
        .arg(&source)
        .arg("--config")
        .arg(root.join(format!("boot/config-{r}")))
        .arg("--symvers")
        .arg(root.join(format!("usr/src/linux-headers-{r}/Module.symvers")))
        .arg("--patches")
        .arg(series.patches_dir(&lab.repo))
        .arg("--dir")
        .arg(&work);
    let status = progress::run_logged(c, &log, "recipe")?;
    if !status.success() {
        return Err(setup(format!(
            "scripts/host-install build failed ({status}); its log, {}, ends:\n{}",
            log.display(),
            progress::log_tail(&log, 15)
        )));
    }
    progress::note(
        "recipe",
        format!("built for {r}; every step it ran: {}", log.display()),
    );
    let mm: String = r.split('.').take(2).collect::<Vec<_>>().join(".");
    Ok(Built {
        work,
        kvm_dir: format!("linux-source-{mm}/arch/x86/kvm"),
    })
}

/// The kernel's modules by name (`kvm_amd` for kvm-amd.ko.xz), under `lib/modules/<r>`.
fn module_index(moddir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)
            .with_context(|| format!("reading {}", d.display()))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.split_once(".ko").map(|(s, _)| s) {
                    out.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    Ok(out)
}

/// `roots` and every module they depend on, transitively (`modinfo -F depends`).
fn closure(sh: &Shell, index: &BTreeMap<String, PathBuf>, roots: &[&str]) -> Result<Vec<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
    let mut out = Vec::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = index
            .get(&name)
            .ok_or_else(|| setup(format!("Debian's kernel has no module {name}")))?;
        let deps = cmd!(sh, "modinfo -F depends {path}").quiet().read()?;
        todo.extend(
            deps.split(',')
                .map(|d| d.trim().replace('-', "_"))
                .filter(|d| !d.is_empty()),
        );
        out.push(path.clone());
    }
    Ok(out)
}

/// L1's root additions: Debian's KVM modules with their dependencies and depmod's index.
fn stage_modules(sh: &Shell, dir: &Path, root: &Path, release: &str) -> Result<PathBuf> {
    let from = root.join("lib/modules").join(release);
    let stage = dir.join("l1root");
    let _ = fs::remove_dir_all(&stage);
    let to = stage.join("lib/modules").join(release);
    fs::create_dir_all(&to)?;
    let index = module_index(&from)?;
    for m in closure(sh, &index, &["kvm", "kvm_amd", "kvm_intel"])? {
        let rel = m.strip_prefix(&from).expect("indexed under it");
        fs::create_dir_all(to.join(rel).parent().expect("a file"))?;
        fs::copy(&m, to.join(rel))?;
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if from.join(f).is_file() {
            fs::copy(from.join(f), to.join(f))?;
        }
    }
    cmd!(sh, "depmod -b {stage} {release}").quiet().run()?;
    Ok(stage)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn file(dest: impl Into<String>, src: impl Into<PathBuf>, mode: u32) -> ImageFile {
    ImageFile {
        dest: dest.into(),
        src: src.into(),
        mode,
    }
}

/// The L1 image: the lab's, plus the modules, kmod, busybox, the recipe and its build.
fn image(
    lab: &Lab,
    sh: &Shell,
    p: &engine::Prepared,
    stage: &Path,
    root: &Path,
    built: &Built,
) -> Result<PathBuf> {
    let guest = match &lab.artifacts.guest_dir {
        Some(d) => d.clone(),
        None => images::build_guest(&lab.sh, &lab.repo, &lab.cfg.build_dir)?,
    };
    let selftest =
        lab.artifacts.selftest.clone().unwrap_or_else(|| {
            KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series).selftest()
        });
    let mut files = images::l1_files(&lab.sh, &p.kernel, &guest, &selftest)?;
    let mut staged = Vec::new();
    walk(stage, &mut staged)?;
    staged.sort();
    for f in staged {
        let dest = f.strip_prefix(stage).expect("walked under it");
        files.push(file(dest.display().to_string(), f.clone(), 0o644));
    }
    // Debian's busybox-static prefers its own applets to PATH in its shell, so the
    // recipe runs under dash, /bin/sh as on Debian; busybox gives the other utilities.
    files.push(file("bin/busybox", root.join("bin/busybox"), 0o755));
    let which = |n: &str| {
        doctor::which(n)
            .ok_or_else(|| setup(format!("{n} is missing: scripts/install-deps installs it")))
    };
    let (kmod, dash) = (which("kmod")?, which("dash")?);
    for n in KMOD_NAMES {
        files.push(file(format!("sbin/{n}"), kmod.clone(), 0o755));
    }
    files.push(file("bin/sh", dash.clone(), 0o755));
    for prog in [&kmod, &dash] {
        for lib in images::parse_ldd(&cmd!(sh, "ldd {prog}").quiet().read()?)? {
            let dest = lib.display().to_string();
            files.push(file(dest.trim_start_matches('/'), lib, 0o755));
        }
    }
    files.push(file(
        format!("{L1_REPO}/scripts/host-install"),
        lab.repo.join("scripts/host-install"),
        0o755,
    ));
    let kvm_dir = &built.kvm_dir;
    for m in ["kvm", "kvm-amd", "kvm-intel"] {
        files.push(file(
            format!("{L1_BUILD}/{kvm_dir}/{m}.ko"),
            built.work.join(kvm_dir).join(format!("{m}.ko")),
            0o644,
        ));
    }
    let out = lab.cfg.build_dir.join("images/l1-host-recipe.cpio");
    if images::assemble(&files, &out)? {
        progress::note(
            "images",
            format!(
                "L1 image for the recipe: {} files, {} MiB",
                files.len(),
                fs::metadata(&out)?.len() >> 20
            ),
        );
    }
    Ok(out)
}

/// A shell command line in L1 (dash, with a PATH).
fn sh_step(script: &str) -> Vec<String> {
    ["/bin/busybox", "env", PATH_ENV, "/bin/sh", "-c", script]
        .map(String::from)
        .to_vec()
}

/// The L1 job: the distribution's KVM as after a boot; the recipe's load refused while
/// /dev/kvm is held; the load; the lab's L2 programs; the restore.
fn job(lab: &Lab) -> exitlab_proto::job::Job {
    let recipe = format!("/{L1_REPO}/scripts/host-install");
    let dir = format!("/{L1_BUILD}");
    let mut steps = vec![
        // busybox's utilities as links, but where a program is already (sh, kmod's).
        Step::Run {
            argv: [
                "/bin/busybox",
                "sh",
                "-c",
                "/bin/busybox mkdir -p /usr/bin /usr/sbin && /bin/busybox --install -s",
            ]
            .map(String::from)
            .to_vec(),
        },
        // What udev does at boot on a machine with AMD-V or VT-x.
        Step::Run {
            argv: sh_step(
                "if grep -qw svm /proc/cpuinfo; then modprobe kvm_amd; else modprobe kvm_intel; fi && lsmod",
            ),
        },
        // A process holding /dev/kvm (as a running VM does): the recipe must refuse.
        Step::Test {
            argv: sh_step(&format!(
                "sleep 600 </dev/kvm & holder=$!; sleep 1; {recipe} load --dir {dir}; rc=$?; kill $holder; wait $holder; exit $rc"
            )),
        },
        Step::Run {
            argv: sh_step(&format!(
                "{recipe} load --dir {dir} && lsmod | grep -E '^(kvm|irqbypass|ccp)'"
            )),
        },
    ];
    steps.extend(engine::l2_vm(&lab.cfg, vec![], crate::scenarios::lab::lab_l2_steps()).steps);
    steps.push(Step::Run {
        argv: sh_step(&format!("{recipe} restore && lsmod | grep -E '^kvm'")),
    });
    exitlab_proto::job::Job {
        level: Level::L1,
        steps,
    }
}

/// The checks of the recipe's own steps in L1 (the programs in [`job`]'s order).
pub fn recipe_checks(l1: &[ProgramRun], release: &str, l1_kernel: Option<&str>) -> Vec<Check> {
    let get = |i: usize| l1.get(i).cloned().unwrap_or_default();
    let code = |p: &ProgramRun| p.status.map(|s| s.shell_code());
    let show = |p: &ProgramRun| {
        let text = format!("{}{}", p.stdout, p.stderr);
        let t = text.trim();
        // The recipe's own message if it gave one, wherever it is: a shell's or the
        // kernel's lines can follow it.
        if t.is_empty() {
            "no output".to_string()
        } else {
            t.lines()
                .find(|l| l.contains("host-install: error:"))
                .or_else(|| t.lines().last())
                .unwrap_or_default()
                .to_string()
        }
    };
    let mut c = vec![Check::new(
        "debian-kernel",
        l1_kernel.is_some_and(|k| k.starts_with(release)),
        format!(
            "L1 ran {} (asked: Debian's {release})",
            l1_kernel.unwrap_or("nothing")
        ),
    )];
    let (boot, held, load, restore) = (get(1), get(2), get(3), get(4));
    c.push(Check::new(
        "distribution-kvm",
        code(&boot) == Some(0) && boot.stdout.lines().any(|l| l.starts_with("kvm_")),
        format!(
            "the distribution's modules loaded as at boot: {}",
            boot.stdout
                .lines()
                .filter(|l| l.starts_with("kvm"))
                .map(|l| l.split_whitespace().next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    c.push(Check::new(
        "refuses-while-in-use",
        code(&held) == Some(1)
            && held.stderr.contains("is in use")
            && held.stderr.contains("Nothing was unloaded"),
        format!(
            "with /dev/kvm held, exit {:?}: {}",
            code(&held),
            show(&held)
        ),
    ));
    c.push(Check::new(
        "recipe-load",
        code(&load) == Some(0) && load.stdout.contains("the patched KVM is loaded"),
        format!(
            "exit {:?}: {}",
            code(&load),
            load.stdout
                .lines()
                .find(|l| l.contains("patched"))
                .unwrap_or(&show(&load))
        ),
    ));
    c.push(Check::new(
        "recipe-restore",
        code(&restore) == Some(0) && restore.stdout.lines().any(|l| l.starts_with("kvm")),
        format!("exit {:?}: {}", code(&restore), show(&restore)),
    ));
    c
}

#[derive(Args)]
pub struct HostRecipeArgs {
    #[command(flatten)]
    pub lab: LabArgs,
    /// Debian's kernel to run the recipe on: the one of the installed
    /// linux-source-6.12's (or -6.1's) version, with the series' port to it.
    /// (`--kernel` and `--kernel-series` are the lab's own kernel, which L2 boots here.)
    #[arg(long, value_enum, default_value = "debian-6.12")]
    pub distro: DebianKernel,
}

impl HostRecipeArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        run(&g.lab(self.lab)?, self.distro)
    }
}

/// `labctl host-recipe`.
pub fn run(lab: &Lab, kernel: DebianKernel) -> Result<i32> {
    // The recipe builds the port of the Debian kernel's own version; --kernel-series
    // only chooses the lab's kernel, which L2 runs.
    let series = kernel.series();
    doctor::require(&[
        Need::Executable("apt-get"),
        Need::Executable("dpkg-deb"),
        Need::Executable("modinfo"),
        Need::Executable("depmod"),
        Need::Executable("kmod"),
        Need::Executable("dash"),
        Need::Executable("pahole"),
        Need::KernelSource(series),
    ])?;
    let sh: &Shell = &lab.sh;
    let p = lab.build()?;
    let pair = pair(sh, kernel)?;
    progress::note(
        "recipe",
        format!(
            "Debian's kernel {} pairs with {} {}",
            pair.release,
            series.info().source_package,
            pair.version
        ),
    );
    let dir = lab.cfg.build_dir.join("host-recipe").join(&pair.release);
    fs::create_dir_all(&dir)?;
    let root = fetch(sh, &dir, &pair)?;
    let built = build_modules(lab, series, &dir, &root, &pair)?;
    let stage = stage_modules(sh, &dir, &root, &pair.release)?;
    let image = image(lab, sh, &p, &stage, &root, &built)?;
    let debian = engine::Prepared {
        kernel: root.join(format!("boot/vmlinuz-{}", pair.release)),
        image,
        l1_cmdline_base: String::new(),
        ..p.clone()
    };
    let mut l1_out = engine::stream_output(Level::L1);
    let mut l2_out = engine::stream_output(Level::L2);
    let run = lab.run(&debian, "host-recipe", &job(lab), &[], |m: &Msg| {
        l1_out(m);
        l2_out(m);
    })?;
    let mut checks = vec![run.ran_check()];
    checks.extend(recipe_checks(
        &run.programs(Level::L1),
        &pair.release,
        run.kernel(Level::L1).as_deref(),
    ));
    let (l2_checks, readings) = crate::scenarios::lab::lab_l2_checks(&run);
    checks.extend(l2_checks);
    let mut results = lab.results(&debian, "host-recipe", &run, checks);
    results.body = Some(Body::HostRecipe { readings });
    results.l2 = Some(lab.l2_report(&run));
    let path = engine::write_results(&results, &run)?;
    results.print_summary(&path);
    Ok(results.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_61_release_is_the_abi_package_of_the_sources_version() {
        let c = |n: &str, v: &[&str]| (n.to_string(), v.iter().map(|s| s.to_string()).collect());
        let candidates = vec![
            c("linux-image-6.1.0-54-amd64", &["6.1.190-1"]),
            c("linux-image-6.1.0-56-amd64", &["6.1.192-2"]),
            c("linux-image-6.1.0-55-amd64", &["6.1.192-1"]),
        ];
        assert_eq!(
            release_among("6.1.192-2", &candidates).as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(
            release_among("6.1.192-1", &candidates).as_deref(),
            Some("6.1.0-55-amd64")
        );
        assert_eq!(release_among("6.1.200-1", &candidates), None);
        assert_eq!(release_among("6.1.192-2", &[]), None);
    }

    #[test]
    fn debian_release_of_a_source_version() {
        assert_eq!(
            release_of("6.12.117-1~deb12u1").unwrap(),
            "6.12.117+deb12-amd64"
        );
        assert_eq!(
            release_of("6.12.43-1~deb12u1").unwrap(),
            "6.12.43+deb12-amd64"
        );
        assert!(release_of("6.1.158-1").unwrap_err().contains("~debNN"));
        assert!(release_of("garbage").unwrap_err().contains("revision"));
    }

    fn prog(code: i32, stdout: &str, stderr: &str) -> ProgramRun {
        ProgramRun {
            argv: vec![],
            stdout: stdout.into(),
            stderr: stderr.into(),
            status: Some(exitlab_proto::msg::Status::Code(code)),
        }
    }

    #[test]
    fn the_recipes_steps_are_judged_by_status_and_message() {
        let r = "6.12.117+deb12-amd64";
        let kernel = format!("{r} #1 SMP PREEMPT_DYNAMIC Debian 6.12.117-1~deb12u1");
        let good = vec![
            prog(0, "", ""),
            prog(0, "Module Size Used by\nkvm_amd 1 0\nkvm 2 1 kvm_amd\n", ""),
            prog(
                1,
                "",
                "host-install: error: kvm_amd is in use (1 users). Nothing was unloaded.\n",
            ),
            prog(
                0,
                "+ insmod kvm.ko\nthe patched KVM is loaded (kvm.exit_stats_leaves=Y)\n",
                "",
            ),
            prog(0, "kvm_amd 1 0\nkvm 2 1 kvm_amd\n", ""),
        ];
        let c = recipe_checks(&good, r, Some(&kernel));
        assert!(c.iter().all(|c| c.ok), "{c:?}");
        assert_eq!(c.len(), 5);
        let failing = |i: usize, p: ProgramRun, name: &str| {
            let mut v = good.clone();
            v[i] = p;
            let c = recipe_checks(&v, r, Some(&kernel));
            let bad: Vec<&str> = c
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect();
            assert_eq!(bad, [name]);
        };
        // The refusal did not happen: load went ahead while /dev/kvm was held.
        failing(
            2,
            prog(0, "the patched KVM is loaded", ""),
            "refuses-while-in-use",
        );
        failing(
            3,
            prog(8, "", "insmod: ERROR: could not insert module"),
            "recipe-load",
        );
        failing(1, prog(0, "Module Size Used by\n", ""), "distribution-kvm");
        failing(4, prog(1, "", "error"), "recipe-restore");
        // L1 booted another kernel (the lab's own) or never reported one.
        let c = recipe_checks(&good, r, Some("6.12.117 #27 SMP"));
        assert!(!c[0].ok);
        let c = recipe_checks(&good[..2], r, None);
        assert_eq!(c.iter().filter(|c| !c.ok).count(), 4);
    }

    #[test]
    fn apt_cache_versions() {
        let text = "Package: linux-image-6.12.117+deb12-amd64\nVersion: 6.12.117-1~deb12u1\nX: y\n\nPackage: z\nVersion: 2\n";
        assert_eq!(parse_versions(text), vec!["6.12.117-1~deb12u1", "2"]);
    }
}
