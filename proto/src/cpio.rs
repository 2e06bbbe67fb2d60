//! A writer for the "newc" cpio format the kernel unpacks as its initramfs.
//!
//! labctl writes the L1 image with it, and the L1 init writes the L2 image with it at run
//! time. Archives may be concatenated: the kernel unpacks them in order, later entries
//! overriding earlier ones, which is how a run's job is appended to a cached base image.
//! Parent directories are emitted automatically (the kernel does not create them), and
//! every timestamp is zero so the same inputs give the same bytes.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("archive path {0:?} must be relative, without `.`/`..` components or empty parts")]
    BadPath(String),
    #[error("{path:?}: source {source_path} is {actual} bytes, expected {expected}")]
    SizeChanged {
        path: String,
        source_path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0:?} is larger than the 4 GiB a newc entry can hold")]
    TooLarge(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str) -> Result<(), CpioError> {
        let path = check_path(path)?;
        self.parents(path)?;
        self.dir_entry(path)
    }

    /// A regular file with the given permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let path = check_path(path)?;
        self.parents(path)?;
        let len = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(path.into()))?;
        self.header(path, S_IFREG | (mode & 0o7777), len)?;
        self.write(data)?;
        self.pad()
    }

    /// A regular file copied from the host file `src`, streaming (images hold large binaries).
    pub fn file_from(&mut self, path: &str, mode: u32, src: &Path) -> Result<(), CpioError> {
        let path = check_path(path)?;
        let mut f = File::open(src)?;
        let expected = f.metadata()?.len();
        let len = u32::try_from(expected).map_err(|_| CpioError::TooLarge(path.into()))?;
        self.parents(path)?;
        self.header(path, S_IFREG | (mode & 0o7777), len)?;
        let copied = io::copy(&mut (&mut f).take(expected), &mut self.out)?;
        self.written += copied;
        if copied != expected {
            return Err(CpioError::SizeChanged {
                path: path.into(),
                source_path: src.display().to_string(),
                expected,
                actual: copied,
            });
        }
        self.pad()
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let path = check_path(path)?;
        self.parents(path)?;
        let len = u32::try_from(target.len()).map_err(|_| CpioError::TooLarge(path.into()))?;
        self.header(path, S_IFLNK | 0o777, len)?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry("TRAILER!!!", 0, 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            let parent = &path[..end];
            if !self.dirs.contains(parent) {
                self.dir_entry(parent)?;
            }
            end += 1;
        }
        Ok(())
    }

    fn dir_entry(&mut self, path: &str) -> Result<(), CpioError> {
        if self.dirs.insert(path.to_string()) {
            self.header(path, S_IFDIR | 0o755, 0)?;
        }
        Ok(())
    }

    fn header(&mut self, path: &str, mode: u32, size: u32) -> Result<(), CpioError> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entry(path, ino, mode, size)
    }

    fn entry(&mut self, name: &str, ino: u32, mode: u32, size: u32) -> Result<(), CpioError> {
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = 0,
            rmin = 0,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

fn check_path(path: &str) -> Result<&str, CpioError> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && !path.ends_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains('\0');
    if ok {
        Ok(path)
    } else {
        Err(CpioError::BadPath(path.to_string()))
    }
}

/// One entry of a newc archive, as [`read_entries`] returns it (for tests and checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Reads back a (possibly concatenated) newc archive. Used to check images.
pub fn read_entries(mut buf: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let bad =
        |what: &str| CpioError::Io(io::Error::new(io::ErrorKind::InvalidData, what.to_string()));
    let mut entries = Vec::new();
    let total = buf.len();
    while !buf.is_empty() {
        if buf.iter().all(|&b| b == 0) {
            break;
        }
        if buf.len() < 110 || &buf[..6] != b"070701" {
            return Err(bad("not a newc header"));
        }
        let field = |i: usize| -> Result<u32, CpioError> {
            let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).map_err(|_| bad("hex"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("hex"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let namesize = field(11)? as usize;
        let offset = total - buf.len();
        let name_end = 110 + namesize;
        let data_start = name_end + (4 - (offset + name_end) % 4) % 4;
        let data_end = data_start + size;
        let next = data_end + (4 - (offset + data_end) % 4) % 4;
        if buf.len() < data_end || namesize == 0 {
            return Err(bad("truncated entry"));
        }
        let name = String::from_utf8(buf[110..name_end - 1].to_vec()).map_err(|_| bad("name"))?;
        let data = buf[data_start..data_end].to_vec();
        buf = &buf[next.min(buf.len())..];
        if name == "TRAILER!!!" {
            continue;
        }
        entries.push(Entry { name, mode, data });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_files_dirs_and_links_with_parents_first() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("usr/share/qemu/bios-256k.bin", 0o644, b"bios")
            .unwrap();
        w.file("init", 0o755, b"#!").unwrap();
        w.symlink("lib64/ld.so", "/lib/ld.so").unwrap();
        w.dir("tmp").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = read_entries(&bytes).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/share",
                "usr/share/qemu",
                "usr/share/qemu/bios-256k.bin",
                "init",
                "lib64",
                "lib64/ld.so",
                "tmp"
            ]
        );
        assert_eq!(e[3].data, b"bios");
        assert_eq!(e[3].mode, S_IFREG | 0o644);
        assert_eq!(e[4].mode, S_IFREG | 0o755);
        assert_eq!(e[6].mode & 0o170000, S_IFLNK);
        assert_eq!(e[6].data, b"/lib/ld.so");
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
    }

    #[test]
    fn concatenated_archives_read_in_order() {
        let mut a = CpioWriter::new(Vec::new());
        a.file("lab/job.json", 0o644, b"one").unwrap();
        let mut bytes = a.finish().unwrap();
        let mut b = CpioWriter::new(Vec::new());
        b.file("lab/job.json", 0o644, b"two!!").unwrap();
        bytes.extend(b.finish().unwrap());
        let e = read_entries(&bytes).unwrap();
        let jobs: Vec<_> = e.iter().filter(|e| e.name == "lab/job.json").collect();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].data, b"two!!");
    }

    #[test]
    fn is_deterministic() {
        let make = || {
            let mut w = CpioWriter::new(Vec::new());
            w.file("a/b", 0o600, b"x").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(make(), make());
    }

    #[test]
    fn rejects_unsafe_paths() {
        for p in ["", "/etc/passwd", "a/../b", "./a", "a//b", "a/"] {
            let mut w = CpioWriter::new(Vec::new());
            assert!(
                matches!(w.file(p, 0o644, b""), Err(CpioError::BadPath(_))),
                "{p:?}"
            );
        }
    }

    #[test]
    fn streams_host_files() {
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("blob");
        let data: Vec<u8> = (0..10_001u32).map(|i| i as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.file_from("bin/blob", 0o755, &src).unwrap();
        let e = read_entries(&w.finish().unwrap()).unwrap();
        assert_eq!(e[1].data, data);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
