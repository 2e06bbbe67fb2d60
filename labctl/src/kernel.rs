//! Stage 2 of the pipeline, the kernel build: kernel source → patched tree → `.config` →
//! bzImage and the KVM selftest.
//!
//! The user's source (tarball or tree) is never modified: it is unpacked or copied into
//! `build/kernel/src`. The patch series is applied in a staging area first, so a patch
//! that does not apply leaves the tree as it was; then only files whose content changes
//! are written, so `make` recompiles only what the edit touched.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use xshell::{cmd, Shell};

use crate::doctor::{self, Need};
use crate::error::setup;
use crate::progress::{self, Progress};
use crate::series::KernelSeries;

/// Where the kernel stage keeps its state and outputs.
pub struct KernelDirs {
    pub root: PathBuf,
}

impl KernelDirs {
    /// The build cache of `series` under `build_dir` (each series has its own).
    pub fn new(build_dir: &Path, series: KernelSeries) -> Self {
        Self {
            root: series.cache_dir(build_dir),
        }
    }
    pub fn src(&self) -> PathBuf {
        self.root.join("src")
    }
    pub fn obj(&self) -> PathBuf {
        self.root.join("obj")
    }
    pub fn bzimage(&self) -> PathBuf {
        self.obj().join("arch/x86/boot/bzImage")
    }
    pub fn selftest(&self) -> PathBuf {
        self.root.join("selftests/x86_64/exit_stats_test")
    }
    pub fn info(&self) -> PathBuf {
        self.root.join("build-info.yaml")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("build.log")
    }
    fn orig(&self) -> PathBuf {
        self.root.join("orig")
    }
    fn applied(&self) -> PathBuf {
        self.root.join("applied")
    }
    fn source_id(&self) -> PathBuf {
        self.root.join("source-id")
    }
    /// Written after a complete build: what it was built from (see [`up_to_date`]).
    fn built_stamp(&self) -> PathBuf {
        self.root.join("built-from")
    }
}

/// What a build's outputs depend on besides the tree's files: the source, the series,
/// the configuration fragment, whether the selftest is built, and labctl's own recipe.
fn build_fingerprint(
    source_id: &str,
    patches: &[PathBuf],
    fragment: &Path,
    selftest: bool,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe 1 {}\nsource {source_id}\nselftest {selftest}\n",
        env!("CARGO_PKG_VERSION")
    ));
    for (name, text) in read_series(patches)? {
        h.update(format!("patch {name} {}\n", text.len()));
        h.update(text.as_bytes());
    }
    h.update(fs::read(fragment).with_context(|| format!("reading {}", fragment.display()))?);
    Ok(format!("{:x}", h.finalize()))
}

/// Whether the last complete build is of exactly these inputs and no file of the tree
/// changed since (an edit made by hand in build/kernel/src counts): then `make`, which
/// takes seconds to find nothing to do on this tree, is not run at all.
fn up_to_date(dirs: &KernelDirs, fingerprint: &str, selftest: bool) -> bool {
    let stamp = dirs.built_stamp();
    let Ok(built) = fs::read_to_string(&stamp) else {
        return false;
    };
    let Some(since) = fs::metadata(&stamp).and_then(|m| m.modified()).ok() else {
        return false;
    };
    built == fingerprint
        && dirs.bzimage().is_file()
        && (!selftest || dirs.selftest().is_file())
        && !changed_since(&dirs.src(), since)
}

/// Whether any regular file under `dir` was modified after `since` (or cannot be read).
fn changed_since(dir: &Path, since: std::time::SystemTime) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            return true;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { return true };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                match e.metadata().and_then(|m| m.modified()) {
                    Ok(m) if m <= since => {}
                    _ => return true,
                }
            }
        }
    }
    false
}

/// What was built, from what: written next to the artifacts and into every run's results.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BuildInfo {
    pub source: String,
    pub version: String,
    pub patches: Vec<PatchInfo>,
    pub config_fragment_sha256: String,
    pub bzimage_sha256: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PatchInfo {
    pub name: String,
    pub sha256: String,
}

pub struct KernelInputs<'a> {
    /// The Linux version built: its source's version is checked against it.
    pub series: KernelSeries,
    /// Tarball or tree; None: the distribution's source tarball of the series.
    pub source: Option<&'a Path>,
    /// What to apply, in order: [`lab_kernel_patches`] for the lab's kernel,
    /// [`baseline_patches`] for the benchmark's unpatched baseline.
    pub patches: Vec<PathBuf>,
    /// Also build the series' selftest (part of the series; a baseline has none).
    pub selftest: bool,
    pub config_fragment: &'a Path,
}

/// The lab's L1 kernel: the series, then the lab's workarounds.
pub fn lab_kernel_patches(repo: &Path, s: KernelSeries) -> Result<Vec<PathBuf>> {
    let mut v = series(&s.patches_dir(repo))?;
    v.extend(series(&s.lab_patches_dir(repo))?);
    Ok(v)
}

/// The benchmark's baseline: the lab's workarounds only, so that the series is the
/// one difference between the two kernels.
pub fn baseline_patches(repo: &Path, s: KernelSeries) -> Result<Vec<PathBuf>> {
    series(&s.lab_patches_dir(repo))
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(p: &Path) -> Result<String> {
    Ok(sha256_hex(
        &fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    ))
}

/// The patch series: `*.patch` in name order.
pub fn series(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(setup(format!("no *.patch files in {}", dir.display())));
    }
    Ok(v)
}

/// Builds (incrementally) the patched kernel and the selftest. Returns what was built.
pub fn build(sh: &Shell, dirs: &KernelDirs, inputs: &KernelInputs) -> Result<BuildInfo> {
    doctor::require(&[
        Need::Executable("make"),
        Need::Executable("gcc"),
        Need::Executable("flex"),
        Need::Executable("bison"),
        Need::Executable("bc"),
        Need::Executable("perl"),
        Need::Executable("rsync"),
        Need::File("/usr/include/libelf.h"),
        Need::File("/usr/include/openssl/ssl.h"),
        Need::Executable("patch"),
        Need::Executable("tar"),
        Need::Executable("xz"),
        Need::Executable("gzip"),
    ])?;
    let ks = inputs.series;
    let source = match inputs.source {
        Some(p) => p.to_path_buf(),
        None => ks.default_source().ok_or_else(|| {
            setup(format!(
                "no kernel source given and no {} found\n  install it with: apt-get install -y {}\n  or pass --kernel-src DIR|TARBALL with a Linux {ks} tree",
                ks.default_source_glob(),
                ks.info().source_package
            ))
        })?,
    };
    fs::create_dir_all(&dirs.root)?;
    let source_id = prepare_source(sh, dirs, &source, ks)?;
    let version = kernel_version(&dirs.src(), ks)?;
    let patches = &inputs.patches;
    sync_patches(sh, dirs, patches)?;
    configure(sh, dirs, inputs.config_fragment)?;
    let fingerprint =
        build_fingerprint(&source_id, patches, inputs.config_fragment, inputs.selftest)?;
    if up_to_date(dirs, &fingerprint, inputs.selftest) {
        progress::note("kernel", "up to date: nothing changed since the last build");
    } else {
        // Gone while make runs: an interrupted build is never taken for a complete one.
        let _ = fs::remove_file(dirs.built_stamp());
        make_bzimage(sh, dirs)?;
        if inputs.selftest {
            build_selftest(sh, dirs)?;
        }
        fs::write(dirs.built_stamp(), &fingerprint)?;
    }
    let info = BuildInfo {
        source: source.display().to_string(),
        version,
        patches: patches
            .iter()
            .map(|p| {
                Ok(PatchInfo {
                    name: file_name(p),
                    sha256: sha256_file(p)?,
                })
            })
            .collect::<Result<_>>()?,
        config_fragment_sha256: sha256_file(inputs.config_fragment)?,
        bzimage_sha256: sha256_file(&dirs.bzimage())?,
    };
    fs::write(dirs.info(), serde_yaml_ng::to_string(&info)?)?;
    Ok(info)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Identity of a source: a tarball by path, size and mtime; a tree by path.
fn source_identity(source: &Path) -> Result<String> {
    let m = fs::metadata(source).map_err(|e| {
        setup(format!(
            "kernel source {}: {e}; pass --kernel-src DIR|TARBALL",
            source.display()
        ))
    })?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(if m.is_dir() {
        format!("tree {}", source.canonicalize()?.display())
    } else {
        format!(
            "tarball {} {} {mtime}",
            source.canonicalize()?.display(),
            m.len()
        )
    })
}

/// Reads VERSION/PATCHLEVEL/SUBLEVEL/EXTRAVERSION and insists on `series`' version.
pub fn kernel_version(tree: &Path, series: KernelSeries) -> Result<String> {
    let mk = tree.join("Makefile");
    let text = fs::read_to_string(&mk).map_err(|_| {
        setup(format!(
            "{} is not a Linux source tree (no top-level Makefile)",
            tree.display()
        ))
    })?;
    parse_version(&text).ok_or_else(|| {
        setup(format!(
            "{} is not a Linux source tree (no VERSION/PATCHLEVEL in its Makefile)",
            tree.display()
        ))
    })
    .and_then(|(v, p, s, e)| {
        let found = KernelSeries::from_name(&format!("{v}.{p}"));
        if found != Some(series) {
            let other = found
                .map(|k| format!(", or --kernel-series {k} to build that version's port"))
                .unwrap_or_default();
            return Err(setup(format!(
                "the kernel source is Linux {v}.{p}.{s}, but --kernel-series is {series}: pass --kernel-src with a {series} tree or tarball{other}"
            )));
        }
        Ok(format!("{v}.{p}.{s}{e}"))
    })
}

fn parse_version(makefile: &str) -> Option<(String, String, String, String)> {
    let get = |key: &str| {
        makefile.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    Some((
        get("VERSION")?,
        get("PATCHLEVEL")?,
        get("SUBLEVEL").unwrap_or_else(|| "0".into()),
        get("EXTRAVERSION").unwrap_or_default(),
    ))
}

/// Unpacks or copies `source` into the build tree unless it is already there; returns
/// the source's identity.
fn prepare_source(
    sh: &Shell,
    dirs: &KernelDirs,
    source: &Path,
    series: KernelSeries,
) -> Result<String> {
    let id = source_identity(source)?;
    let src = dirs.src();
    if src.join("Makefile").is_file()
        && fs::read_to_string(dirs.source_id()).ok().as_deref() == Some(id.as_str())
    {
        return Ok(id);
    }
    let fresh = dirs.root.join("src.new");
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh)?;
    let p = Progress::new("kernel");
    if source.is_dir() {
        kernel_version(source, series)?;
        progress::note(
            "kernel",
            format!("copying {} (it is not modified)", source.display()),
        );
        let from = source.join(".");
        cmd!(sh, "cp -a {from} {fresh}").quiet().run()?;
        if fresh.join(".config").exists() {
            // A tree configured or built in place cannot be used with O=; clean our copy.
            cmd!(sh, "make -s -C {fresh} mrproper").quiet().run()?;
        }
    } else {
        progress::note("kernel", format!("unpacking {}", source.display()));
        cmd!(sh, "tar -xf {source} -C {fresh} --strip-components=1")
            .quiet()
            .run()
            .map_err(|e| setup(format!("cannot unpack {}: {e}", source.display())))?;
        kernel_version(&fresh, series)?;
    }
    for d in [src.clone(), dirs.orig(), dirs.applied(), dirs.obj()] {
        let _ = fs::remove_dir_all(&d);
    }
    fs::rename(&fresh, &src)?;
    fs::write(dirs.source_id(), &id)?;
    p.done("source ready");
    Ok(id)
}

/// Files a patch touches, from its `--- a/…` and `+++ b/…` lines.
pub fn touched_files(patch: &str) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for l in patch.lines() {
        let path = l
            .strip_prefix("--- a/")
            .or_else(|| l.strip_prefix("+++ b/"));
        if let Some(p) = path {
            let p = p.split('\t').next().unwrap_or(p).trim_end();
            files.insert(p.to_string());
        }
    }
    files
}

fn read_series(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    paths
        .iter()
        .map(|p| {
            Ok((
                file_name(p),
                fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ))
        })
        .collect()
}

/// Makes the tree equal pristine + `patches`, touching only files whose content changes.
fn sync_patches(sh: &Shell, dirs: &KernelDirs, patches: &[PathBuf]) -> Result<()> {
    let new = read_series(patches)?;
    let applied_dir = dirs.applied();
    let mut old_paths: Vec<PathBuf> = fs::read_dir(&applied_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    old_paths.sort();
    let old = read_series(&old_paths)?;
    if old == new {
        return Ok(());
    }
    let src = dirs.src();
    let orig = dirs.orig();
    let absent_list = orig.join(".absent");
    let absent: BTreeSet<String> = fs::read_to_string(&absent_list)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    let mut files = BTreeSet::new();
    for (_, text) in old.iter().chain(new.iter()) {
        files.extend(touched_files(text));
    }

    // Stage the pristine versions of every file either series touches.
    let staging = dirs.root.join("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    for f in &files {
        let pristine = if orig.join(f).is_file() {
            Some(orig.join(f))
        } else if absent.contains(f) {
            None
        } else if src.join(f).is_file() {
            Some(src.join(f))
        } else {
            None
        };
        if let Some(p) = pristine {
            let dst = staging.join(f);
            fs::create_dir_all(dst.parent().expect("relative path has a parent"))?;
            fs::copy(&p, &dst)?;
        }
    }
    for (p, (name, _)) in patches.iter().zip(&new) {
        let rej = dirs.root.join("rejected.rej");
        let _ = fs::remove_file(&rej);
        let out = cmd!(
            sh,
            "patch -p1 --batch --forward --no-backup-if-mismatch -r {rej} -d {staging} -i {p}"
        )
        .quiet()
        .ignore_status()
        .output()?;
        if !out.status.success() {
            let rejected = fs::read_to_string(&rej).unwrap_or_default();
            return Err(setup(format!(
                "patch {name} does not apply to the kernel source (nothing was changed; the tree stays as it was):\n{}{}\n  rejected hunk(s):\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                rejected.lines().take(60).collect::<Vec<_>>().join("\n")
            )));
        }
    }
    // Record pristine copies of files touched for the first time, then write changes.
    let mut absent = absent;
    for f in &files {
        if orig.join(f).is_file() || absent.contains(f) {
            continue;
        }
        if src.join(f).is_file() {
            let dst = orig.join(f);
            fs::create_dir_all(dst.parent().expect("relative path has a parent"))?;
            fs::copy(src.join(f), dst)?;
        } else {
            absent.insert(f.clone());
        }
    }
    fs::create_dir_all(&orig)?;
    fs::write(
        &absent_list,
        absent.iter().map(|s| format!("{s}\n")).collect::<String>(),
    )?;
    let mut changed = 0;
    for f in &files {
        let staged = fs::read(staging.join(f)).ok();
        let current = fs::read(src.join(f)).ok();
        if staged == current {
            continue;
        }
        changed += 1;
        match staged {
            Some(data) => {
                let dst = src.join(f);
                fs::create_dir_all(dst.parent().expect("relative path has a parent"))?;
                fs::write(dst, data)?;
            }
            None => fs::remove_file(src.join(f))?,
        }
    }
    let _ = fs::remove_dir_all(&applied_dir);
    fs::create_dir_all(&applied_dir)?;
    for p in patches {
        fs::copy(p, applied_dir.join(file_name(p)))?;
    }
    let _ = fs::remove_dir_all(&staging);
    progress::note(
        "kernel",
        format!(
            "applied {} patches ({changed} files changed)",
            patches.len()
        ),
    );
    Ok(())
}

/// One `CONFIG_X=value` (or `# CONFIG_X is not set`, value "n") per option.
pub fn parse_config(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name
                    .starts_with("CONFIG_")
                    .then(|| (name.to_string(), "n".into()));
            }
            let (k, v) = l.split_once('=')?;
            k.starts_with("CONFIG_")
                .then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Lays the fragment over a .config (like `merge_config.sh -m`).
pub fn merge_config(base: &str, fragment: &[(String, String)]) -> String {
    let keys: BTreeSet<&str> = fragment.iter().map(|(k, _)| k.as_str()).collect();
    let mut out: Vec<String> = base
        .lines()
        .filter(|l| {
            parse_config(l)
                .first()
                .is_none_or(|(k, _)| !keys.contains(k.as_str()))
        })
        .map(String::from)
        .collect();
    for (k, v) in fragment {
        out.push(if v == "n" {
            format!("# {k} is not set")
        } else {
            format!("{k}={v}")
        });
    }
    out.join("\n") + "\n"
}

/// Options of the fragment that the final .config does not have as asked.
pub fn dropped_options(fragment: &[(String, String)], final_config: &str) -> Vec<String> {
    let have: std::collections::BTreeMap<String, String> =
        parse_config(final_config).into_iter().collect();
    fragment
        .iter()
        .filter(|(k, v)| have.get(k).map_or("n", String::as_str) != v.as_str())
        .map(|(k, v)| {
            format!(
                "{k}={v} (got {})",
                have.get(k).map_or("not set", String::as_str)
            )
        })
        .collect()
}

fn configure(sh: &Shell, dirs: &KernelDirs, fragment_path: &Path) -> Result<()> {
    let fragment_text = fs::read_to_string(fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let fragment = parse_config(&fragment_text);
    let stamp = dirs.obj().join(".lab-config-sha256");
    let want = sha256_hex(fragment_text.as_bytes());
    let config = dirs.obj().join(".config");
    if config.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    fs::create_dir_all(dirs.obj())?;
    let (src, obj) = (dirs.src(), dirs.obj());
    cmd!(sh, "make -s -C {src} O={obj} tinyconfig")
        .quiet()
        .run()?;
    let merged = merge_config(&fs::read_to_string(&config)?, &fragment);
    fs::write(&config, merged)?;
    cmd!(sh, "make -s -C {src} O={obj} olddefconfig")
        .quiet()
        .run()?;
    let dropped = dropped_options(&fragment, &fs::read_to_string(&config)?);
    if !dropped.is_empty() {
        return Err(setup(format!(
            "{} asks for options that did not survive `make olddefconfig` (a dependency is missing, or the option does not exist in this kernel):\n  {}",
            fragment_path.display(),
            dropped.join("\n  ")
        )));
    }
    fs::write(stamp, want)?;
    progress::note(
        "kernel",
        format!("configured: tinyconfig + {}", fragment_path.display()),
    );
    Ok(())
}

/// Runs make, showing progress and keeping the whole output in build.log.
fn run_make(sh: &Shell, dirs: &KernelDirs, label: &'static str, args: &[String]) -> Result<()> {
    run_make_logged(sh, &dirs.log(), label, args)
}

fn run_make_logged(
    sh: &Shell,
    log_path: &Path,
    label: &'static str,
    args: &[String],
) -> Result<()> {
    let command: std::process::Command = cmd!(sh, "make {args...}").into();
    let status = progress::run_logged(command, log_path, label)?;
    if !status.success() {
        return Err(setup(format!(
            "kernel build failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            progress::log_tail(log_path, 40)
        )));
    }
    Ok(())
}

fn make_bzimage(sh: &Shell, dirs: &KernelDirs) -> Result<()> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let _ = fs::remove_file(dirs.log());
    run_make(
        sh,
        dirs,
        "kernel",
        &[
            "-C".into(),
            dirs.src().display().to_string(),
            format!("O={}", dirs.obj().display()),
            format!("-j{jobs}"),
            "bzImage".into(),
        ],
    )
}

/// Builds upstream KVM selftests (paths under `tools/testing/selftests/kvm`, e.g.
/// `x86_64/cpuid_test`) from the patched tree, after `build()`: returns their binaries.
pub fn build_kvm_selftests(
    sh: &Shell,
    dirs: &KernelDirs,
    tests: &[String],
) -> Result<Vec<PathBuf>> {
    let out = dirs.root.join("kvm-selftests");
    fs::create_dir_all(&out)?;
    let bins: Vec<PathBuf> = tests.iter().map(|t| out.join(t)).collect();
    run_make(
        sh,
        dirs,
        "kvm-selftests",
        &selftest_make_args(dirs, &out, &bins),
    )?;
    Ok(bins)
}

/// `make` arguments that build `targets` (binaries under `out`) from the tree's KVM
/// selftests, against the headers `headers_install` put in the object tree.
fn selftest_make_args(dirs: &KernelDirs, out: &Path, targets: &[PathBuf]) -> Vec<String> {
    let hdr = dirs.obj().join("usr");
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = vec![
        "-C".into(),
        dirs.src()
            .join("tools/testing/selftests/kvm")
            .display()
            .to_string(),
        format!("-j{jobs}"),
        format!("OUTPUT={}", out.display()),
        format!("LINUX_HDR_PATH={}/include/", hdr.display()),
    ];
    args.extend(targets.iter().map(|t| t.display().to_string()));
    args
}

fn build_selftest(sh: &Shell, dirs: &KernelDirs) -> Result<()> {
    let hdr = dirs.obj().join("usr");
    run_make(
        sh,
        dirs,
        "headers",
        &[
            "-s".into(),
            "-C".into(),
            dirs.src().display().to_string(),
            format!("O={}", dirs.obj().display()),
            format!("INSTALL_HDR_PATH={}", hdr.display()),
            "headers_install".into(),
        ],
    )?;
    let out = dirs.root.join("selftests");
    fs::create_dir_all(&out)?;
    run_make(
        sh,
        dirs,
        "selftest",
        &selftest_make_args(dirs, &out, &[dirs.selftest()]),
    )
}

/// checkpatch's warning for any added file ("does MAINTAINERS need updating?"). The
/// selftest is covered by the existing KVM entry (`F: tools/testing/selftests/kvm/`).
pub const CHECKPATCH_IGNORED: &str = "FILE_PATH_CHANGES";

/// Totals of one checkpatch report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpatchTotals {
    pub errors: u32,
    pub warnings: u32,
    pub checks: u32,
}

/// Parses checkpatch's `total: N errors, N warnings, N checks, …` line.
pub fn parse_checkpatch_totals(out: &str) -> Option<CheckpatchTotals> {
    let line = out.lines().find(|l| l.starts_with("total: "))?;
    let num = |what: &str| -> Option<u32> {
        line.split(", ")
            .map(|p| p.trim_start_matches("total: "))
            .find(|p| p.ends_with(what) || p.ends_with(&what[..what.len() - 1]))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(CheckpatchTotals {
        errors: num("errors")?,
        warnings: num("warnings")?,
        checks: num("checks")?,
    })
}

/// One finding of the kernel quality gate.
pub struct GateResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// `labctl kernel-check`: checkpatch --strict on every patch, and a W=1 build of
/// arch/x86/kvm (in its own object directory, so the lab's build stays incremental).
pub fn quality_gate(sh: &Shell, dirs: &KernelDirs, patches: &[PathBuf]) -> Result<Vec<GateResult>> {
    let src = dirs.src();
    let checkpatch = src.join("scripts/checkpatch.pl");
    if !checkpatch.is_file() {
        return Err(setup(format!(
            "{} is missing: run `labctl build` first",
            checkpatch.display()
        )));
    }
    let _in_src = sh.push_dir(&src);
    let mut results = Vec::new();
    for p in patches {
        let out = cmd!(
            sh,
            "perl {checkpatch} --strict --no-color --ignore {CHECKPATCH_IGNORED} {p}"
        )
        .quiet()
        .ignore_status()
        .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let totals = parse_checkpatch_totals(&text);
        let ok = out.status.success() && totals == Some(CheckpatchTotals::default());
        results.push(GateResult {
            name: format!("checkpatch --strict {}", file_name(p)),
            ok,
            detail: if ok {
                "0 errors, 0 warnings, 0 checks".into()
            } else {
                text
            },
        });
    }

    let obj = dirs.root.join("obj-w1");
    fs::create_dir_all(&obj)?;
    let config = fs::read(dirs.obj().join(".config"))
        .map_err(|_| setup("no kernel .config yet: run `labctl build` first"))?;
    if fs::read(obj.join(".config")).ok().as_ref() != Some(&config) {
        fs::write(obj.join(".config"), &config)?;
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log = dirs.root.join("w1.log");
    let _ = fs::remove_file(&log);
    let build = run_make_logged(
        sh,
        &log,
        "W=1",
        &[
            "-C".into(),
            src.display().to_string(),
            format!("O={}", obj.display()),
            format!("-j{jobs}"),
            "W=1".into(),
            "olddefconfig".into(),
            "arch/x86/kvm/".into(),
        ],
    );
    let text = fs::read_to_string(&log).unwrap_or_default();
    let touched: BTreeSet<String> = read_series(patches)?
        .iter()
        .flat_map(|(_, text)| touched_files(text))
        .collect();
    let (ours, upstream) = split_warnings(&text, &src, &touched);
    results.push(GateResult {
        name: "make W=1 arch/x86/kvm/".into(),
        ok: build.is_ok() && ours.is_empty(),
        detail: match (&build, ours.is_empty()) {
            (Ok(()), true) if upstream.is_empty() => format!("no warnings ({})", log.display()),
            (Ok(()), true) => format!(
                "no warnings in the files the patches touch; {} in files they do not, the source's own ({})",
                upstream.len(),
                log.display()
            ),
            (Err(e), _) => format!("{e:#}"),
            _ => ours.join("\n"),
        },
    });
    Ok(results)
}

/// W=1's warnings and errors, split into those in files the patches touch (or with no
/// file: the compiler's own) and those elsewhere, which the unpatched source has too
/// (6.1's mmu.c has kernel-doc warnings, for one).
fn split_warnings<'a>(
    log: &'a str,
    src: &Path,
    touched: &BTreeSet<String>,
) -> (Vec<&'a str>, Vec<&'a str>) {
    let prefix = format!("{}/", src.display());
    log.lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        .partition(|l| {
            let path = l.strip_prefix(prefix.as_str()).unwrap_or(l);
            match path.split_once(':') {
                Some((file, _)) if file.contains('/') => touched.contains(file),
                _ => true,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w1_warnings_in_files_the_patches_do_not_touch_are_the_sources_own() {
        let src = Path::new("/b/src");
        let touched: BTreeSet<String> = ["arch/x86/kvm/x86.c".to_string()].into();
        let log = "  CC arch/x86/kvm/x86.o\n\
/b/src/arch/x86/kvm/mmu/mmu.c:1325: warning: Function parameter or member 'kvm' not described\n\
/b/src/arch/x86/kvm/x86.c:10: warning: unused variable 'x'\n\
arch/x86/kvm/x86.c:11:2: error: oops\n\
cc1: warning: command-line option\n";
        let (ours, upstream) = split_warnings(log, src, &touched);
        assert_eq!(ours.len(), 3, "{ours:?}");
        assert_eq!(upstream.len(), 1, "{upstream:?}");
        assert!(upstream[0].contains("mmu.c"));
    }

    #[test]
    fn a_build_is_up_to_date_only_for_the_same_inputs_and_an_untouched_tree() {
        let root = std::env::temp_dir().join(format!("utd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dirs = KernelDirs { root: root.clone() };
        fs::create_dir_all(dirs.src().join("arch/x86/kvm")).unwrap();
        fs::write(dirs.src().join("arch/x86/kvm/x86.c"), "int x;").unwrap();
        let patch = root.join("0001.patch");
        fs::write(&patch, "--- a/x\n+++ b/x\n").unwrap();
        let frag = root.join("lab.config");
        fs::write(&frag, "CONFIG_KVM=y\n").unwrap();
        let fp = |sel| {
            build_fingerprint("tarball t 1 2", std::slice::from_ref(&patch), &frag, sel).unwrap()
        };
        let f = fp(true);
        assert_ne!(f, fp(false));
        // Never built: not up to date.
        assert!(!up_to_date(&dirs, &f, true));
        fs::create_dir_all(dirs.bzimage().parent().unwrap()).unwrap();
        fs::write(dirs.bzimage(), "bz").unwrap();
        fs::create_dir_all(dirs.selftest().parent().unwrap()).unwrap();
        fs::write(dirs.selftest(), "st").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(dirs.built_stamp(), &f).unwrap();
        assert!(up_to_date(&dirs, &f, true));
        // Another series, fragment or source: rebuild.
        fs::write(&patch, "--- a/y\n+++ b/y\n").unwrap();
        assert!(!up_to_date(&dirs, &fp(true), true));
        assert_ne!(
            build_fingerprint("tarball t 1 3", std::slice::from_ref(&patch), &frag, true).unwrap(),
            fp(true)
        );
        // A file of the tree edited by hand after the build: rebuild.
        let f = fp(true);
        fs::write(dirs.built_stamp(), &f).unwrap();
        assert!(up_to_date(&dirs, &f, true));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(dirs.src().join("arch/x86/kvm/x86.c"), "int y;").unwrap();
        assert!(!up_to_date(&dirs, &f, true));
        // An output gone: rebuild.
        fs::write(dirs.built_stamp(), &f).unwrap();
        fs::remove_file(dirs.selftest()).unwrap();
        assert!(!up_to_date(&dirs, &f, true));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn version_must_be_the_series_version() {
        let mk = "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\nNAME = Baby Opossum Posse\n";
        assert_eq!(
            parse_version(mk),
            Some(("6".into(), "12".into(), "117".into(), "".into()))
        );
        let dir = std::env::temp_dir().join(format!("kv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("Makefile"), mk).unwrap();
        assert_eq!(
            kernel_version(&dir, KernelSeries::V6_12).unwrap(),
            "6.12.117"
        );
        let e = kernel_version(&dir, KernelSeries::V6_1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("but --kernel-series is 6.1"), "{e}");
        assert!(e.contains("or --kernel-series 6.12"), "{e}");
        fs::write(
            dir.join("Makefile"),
            mk.replace("12", "1").replace("117", "192"),
        )
        .unwrap();
        assert_eq!(kernel_version(&dir, KernelSeries::V6_1).unwrap(), "6.1.192");
        fs::write(dir.join("Makefile"), mk.replace("12", "6")).unwrap();
        let e = kernel_version(&dir, KernelSeries::V6_12)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Linux 6.6.117, but --kernel-series is 6.12"),
            "{e}"
        );
        assert!(!e.contains("or --kernel-series"), "{e}");
        fs::remove_file(dir.join("Makefile")).unwrap();
        let e = kernel_version(&dir, KernelSeries::V6_12)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Linux source tree"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn config_merge_and_dropped_options() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n# comment\n";
        let frag = parse_config("CONFIG_B=y\nCONFIG_C=n\n# CONFIG_D is not set\nCONFIG_E=64\n");
        let merged = merge_config(base, &frag);
        assert!(merged.contains("CONFIG_A=y\n"));
        assert!(merged.contains("CONFIG_B=y\n"));
        assert!(merged.contains("# CONFIG_C is not set\n"));
        assert!(merged.contains("CONFIG_E=64\n"));
        assert!(merged.contains("# comment\n"));
        assert!(!merged.contains("CONFIG_C=m"));
        assert!(dropped_options(&frag, &merged).is_empty());
        let after = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_E=32\n";
        assert_eq!(
            dropped_options(&frag, after),
            vec!["CONFIG_E=64 (got 32)".to_string()]
        );
        let after = "CONFIG_A=y\n# CONFIG_C is not set\nCONFIG_E=64\n";
        assert_eq!(
            dropped_options(&frag, after),
            vec!["CONFIG_B=y (got not set)".to_string()]
        );
    }

    #[test]
    fn touched_files_of_a_git_patch() {
        let p = "diff --git a/arch/x86/kvm/x86.c b/arch/x86/kvm/x86.c\n--- a/arch/x86/kvm/x86.c\n+++ b/arch/x86/kvm/x86.c\n@@ -1 +1 @@\n--- /dev/null\n+++ b/tools/new.c\n";
        let f: Vec<_> = touched_files(p).into_iter().collect();
        assert_eq!(f, ["arch/x86/kvm/x86.c", "tools/new.c"]);
    }

    fn diff(path: &str, old: &str, new: &str) -> String {
        format!("--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-{old}\n+{new}\n")
    }

    #[test]
    fn patches_sync_minimally_and_a_bad_patch_changes_nothing() {
        if doctor::which("patch").is_none() {
            panic!("this test needs GNU patch: apt-get install -y patch");
        }
        let sh = Shell::new().unwrap();
        let root = std::env::temp_dir().join(format!("sync-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dirs = KernelDirs {
            root: root.join("kernel"),
        };
        let src = dirs.src();
        fs::create_dir_all(src.join("arch")).unwrap();
        fs::write(src.join("arch/a.c"), "alpha\n").unwrap();
        fs::write(src.join("b.c"), "beta\n").unwrap();
        let pdir = root.join("patches");
        fs::create_dir_all(&pdir).unwrap();
        let p1 = pdir.join("0001-a.patch");
        let p2 = pdir.join("0002-b.patch");
        fs::write(&p1, diff("arch/a.c", "alpha", "ALPHA")).unwrap();
        fs::write(&p2, diff("b.c", "beta", "BETA")).unwrap();
        sync_patches(&sh, &dirs, &series(&pdir).unwrap()).unwrap();
        assert_eq!(fs::read_to_string(src.join("arch/a.c")).unwrap(), "ALPHA\n");
        assert_eq!(fs::read_to_string(src.join("b.c")).unwrap(), "BETA\n");

        // Editing one patch rewrites only the file it touches.
        let before = fs::metadata(src.join("b.c")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&p1, diff("arch/a.c", "alpha", "Alpha")).unwrap();
        sync_patches(&sh, &dirs, &series(&pdir).unwrap()).unwrap();
        assert_eq!(fs::read_to_string(src.join("arch/a.c")).unwrap(), "Alpha\n");
        assert_eq!(
            fs::metadata(src.join("b.c")).unwrap().modified().unwrap(),
            before
        );

        // Dropping a patch restores the pristine file.
        fs::remove_file(&p2).unwrap();
        sync_patches(&sh, &dirs, &series(&pdir).unwrap()).unwrap();
        assert_eq!(fs::read_to_string(src.join("b.c")).unwrap(), "beta\n");

        // A patch that does not apply names itself and its hunk, and changes nothing.
        fs::write(pdir.join("0002-bad.patch"), diff("b.c", "gamma", "GAMMA")).unwrap();
        fs::write(&p1, diff("arch/a.c", "alpha", "NEW")).unwrap();
        let e = sync_patches(&sh, &dirs, &series(&pdir).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("0002-bad.patch"), "{e}");
        assert!(e.contains("-gamma"), "{e}");
        assert_eq!(fs::read_to_string(src.join("arch/a.c")).unwrap(), "Alpha\n");
        assert_eq!(fs::read_to_string(src.join("b.c")).unwrap(), "beta\n");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn checkpatch_totals() {
        let out = "foo\ntotal: 0 errors, 1 warnings, 2 checks, 66 lines checked\n";
        assert_eq!(
            parse_checkpatch_totals(out),
            Some(CheckpatchTotals {
                errors: 0,
                warnings: 1,
                checks: 2
            })
        );
        assert_eq!(parse_checkpatch_totals("nothing"), None);
    }

    #[test]
    fn the_shipped_fragment_parses() {
        let frag = include_str!("../../kernel/lab.config");
        let opts = parse_config(frag);
        for must in [
            "CONFIG_KVM",
            "CONFIG_KVM_AMD",
            "CONFIG_KVM_INTEL",
            "CONFIG_DEBUG_FS",
        ] {
            assert!(
                opts.iter().any(|(k, v)| k == must && v == "y"),
                "{must} missing"
            );
        }
    }
}
