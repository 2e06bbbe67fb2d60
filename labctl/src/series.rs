//! The kernel series the lab builds, as data: one row per Linux version the patch
//! series is ported to. Adding a version is adding a row (and its `kernel/<version>/`
//! directory): the build, its caches and its checks take every version from here
//! (`host-recipe` also knows how Debian names each version's kernel packages).

use std::fmt;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::{de, Deserialize, Deserializer, Serialize};

/// A Linux version with a port of the patch series in `kernel/<version>/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, ValueEnum, Serialize)]
pub enum KernelSeries {
    /// Linux 6.12, the series' own version (Debian 12 ships it as linux-source-6.12).
    #[default]
    #[value(name = "6.12")]
    #[serde(rename = "6.12")]
    V6_12,
    /// Linux 6.1, Debian 12's default kernel (linux-source-6.1): the series ported.
    #[value(name = "6.1")]
    #[serde(rename = "6.1")]
    V6_1,
}

/// From a string. YAML reads `kernel_series: 6.1` unquoted as a number, which cannot
/// tell 6.1 from 6.10: that is an error saying to quote it.
impl<'de> Deserialize<'de> for KernelSeries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = KernelSeries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let names: Vec<&str> = KernelSeries::ALL.iter().map(|s| s.name()).collect();
                write!(f, "a kernel series, one of {}", names.join(", "))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KernelSeries, E> {
                KernelSeries::from_name(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KernelSeries, E> {
                Err(E::custom(format!(
                    "kernel series {v} is a number to YAML (6.1 and 6.10 read the same): quote it, e.g. \"{v}\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// What labctl knows about one series.
pub struct SeriesInfo {
    /// `VERSION.PATCHLEVEL` of the kernel, as its Makefile gives them, e.g. "6.12".
    pub name: &'static str,
    /// The Debian package whose tarball (`/usr/src/<package>.tar.*`) is the default source.
    pub source_package: &'static str,
    /// Directory of the series in the repository (`patches/`, `lab-patches/`).
    pub dir: &'static str,
    /// Directory of its build cache under the build directory: each series has its own,
    /// so building one never invalidates the other.
    pub cache: &'static str,
    /// The nixpkgs kernel the flake builds the series on, if the flake has it.
    pub nixpkgs_attr: Option<&'static str>,
}

const SERIES: [(KernelSeries, SeriesInfo); 2] = [
    (
        KernelSeries::V6_12,
        SeriesInfo {
            name: "6.12",
            source_package: "linux-source-6.12",
            dir: "kernel/6.12",
            cache: "kernel",
            nixpkgs_attr: Some("linux_6_12"),
        },
    ),
    (
        KernelSeries::V6_1,
        SeriesInfo {
            name: "6.1",
            source_package: "linux-source-6.1",
            dir: "kernel/6.1",
            cache: "kernel-6.1",
            nixpkgs_attr: None,
        },
    ),
];

/// Where distributions put kernel source tarballs.
pub const DEFAULT_SOURCE_DIR: &str = "/usr/src";

impl KernelSeries {
    pub const ALL: [KernelSeries; 2] = [KernelSeries::V6_12, KernelSeries::V6_1];

    pub fn info(self) -> &'static SeriesInfo {
        &SERIES
            .iter()
            .find(|(s, _)| *s == self)
            .expect("every series has a row")
            .1
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The series called `name` ("6.12", "6.1"), if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The series under study: `kernel/<version>/patches`.
    pub fn patches_dir(self, repo: &Path) -> PathBuf {
        repo.join(self.info().dir).join("patches")
    }

    /// The lab's workarounds for the CPU it emulates, not part of the series:
    /// `kernel/<version>/lab-patches`, applied after the series and to a baseline alike.
    pub fn lab_patches_dir(self, repo: &Path) -> PathBuf {
        repo.join(self.info().dir).join("lab-patches")
    }

    /// The build cache of this series under `build_dir`.
    pub fn cache_dir(self, build_dir: &Path) -> PathBuf {
        build_dir.join(self.info().cache)
    }

    /// The glob of the default source, for messages: `/usr/src/linux-source-6.12.tar.*`.
    pub fn default_source_glob(self) -> String {
        format!("{DEFAULT_SOURCE_DIR}/{}.tar.*", self.info().source_package)
    }

    /// The default source: the distribution's `<package>.tar.*` under /usr/src.
    pub fn default_source(self) -> Option<PathBuf> {
        let prefix = format!("{}.tar", self.info().source_package);
        let mut found: Vec<PathBuf> = std::fs::read_dir(DEFAULT_SOURCE_DIR)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        found.sort();
        found.pop()
    }
}

impl fmt::Display for KernelSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_its_directory_and_a_cache_of_its_own() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut caches = std::collections::BTreeSet::new();
        for s in KernelSeries::ALL {
            assert!(s.patches_dir(&repo).is_dir(), "{s}: no patches dir");
            assert!(s.lab_patches_dir(&repo).is_dir(), "{s}: no lab-patches dir");
            assert!(caches.insert(s.info().cache), "{s}: cache shared");
            assert_eq!(KernelSeries::from_name(s.name()), Some(s));
            assert_eq!(s.info().source_package, format!("linux-source-{s}"));
        }
        assert_eq!(KernelSeries::default(), KernelSeries::V6_12);
    }

    #[test]
    fn the_flake_builds_the_series_it_says() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let flake = std::fs::read_to_string(repo.join("flake.nix")).unwrap();
        let in_flake: Vec<KernelSeries> = KernelSeries::ALL
            .into_iter()
            .filter(|s| s.info().nixpkgs_attr.is_some())
            .collect();
        assert_eq!(in_flake, [KernelSeries::V6_12]);
        for s in in_flake {
            let attr = s.info().nixpkgs_attr.unwrap();
            assert!(flake.contains(&format!("pkgs.{attr};")), "{attr}");
            assert!(flake.contains(&format!("./{}/patches", s.info().dir)));
            assert!(flake.contains(&format!("./{}/lab-patches", s.info().dir)));
        }
    }

    #[test]
    fn names_parse_on_the_command_line_and_in_yaml() {
        assert_eq!(
            KernelSeries::from_str("6.1", false).unwrap(),
            KernelSeries::V6_1
        );
        assert!(KernelSeries::from_str("6.2", false).is_err());
        assert_eq!(KernelSeries::from_name("6.1"), Some(KernelSeries::V6_1));
        assert_eq!(KernelSeries::from_name("6.10"), None);
        let s: KernelSeries = serde_yaml_ng::from_str("\"6.12\"").unwrap();
        assert_eq!(s, KernelSeries::V6_12);
        let e = serde_yaml_ng::from_str::<KernelSeries>("6.1").unwrap_err();
        assert!(e.to_string().contains("quote it"), "{e}");
        let e = serde_yaml_ng::from_str::<KernelSeries>("\"5.10\"").unwrap_err();
        assert!(e.to_string().contains("one of 6.12, 6.1"), "{e}");
        assert!(serde_yaml_ng::from_str::<KernelSeries>("6.10").is_err());
    }
}
