//! KVM's own per-vCPU statistics of a VM run by another process (QEMU), read in L1.
//!
//! The vCPU file descriptors are found as `anon_inode:kvm-vcpu:<id>` links in
//! `/proc/<qemu>/fd`, duplicated into this process with `pidfd_getfd(2)`, and each gives a
//! binary statistics fd (`KVM_GET_STATS_FD`) whose descriptors name every statistic,
//! including `exits` and the patch's `exit_cycles`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use exitlab_proto::msg::{VcpuStats, VmStats};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("listing /proc/{pid}/fd: {source}")]
    Proc { pid: i32, source: std::io::Error },
    #[error("process {0} has no KVM vCPU file descriptors")]
    NoVcpus(i32),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("malformed KVM stats data: {0}")]
    Malformed(&'static str),
}

const KVMIO: u8 = 0xAE;
nix::ioctl_none!(kvm_get_stats_fd, KVMIO, 0xce);

/// Size of `struct kvm_stats_header` and of the fixed part of `struct kvm_stats_desc`.
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;
const KVM_STATS_TYPE_MASK: u32 = 0xf;
/// Histograms have more than one value; only scalar statistics are reported.
const KVM_STATS_TYPE_LINEAR_HIST: u32 = 3;
const KVM_STATS_TYPE_LOG_HIST: u32 = 4;

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StatsError {
    let what = what.into();
    move |source| StatsError::Sys { what, source }
}

/// The open statistics of the vCPUs of one VMM process.
pub struct VmStatsReader {
    pid: i32,
    vcpus: BTreeMap<u32, File>,
}

impl VmStatsReader {
    pub fn new(pid: i32) -> Self {
        Self {
            pid,
            vcpus: BTreeMap::new(),
        }
    }

    /// Reads every vCPU's statistics now (opening the ones created since the last call).
    pub fn read(&mut self) -> Result<VmStats, StatsError> {
        self.discover()?;
        let mut vcpus = Vec::new();
        for (id, f) in &self.vcpus {
            vcpus.push(VcpuStats {
                id: *id,
                stats: read_stats(f)?,
            });
        }
        Ok(VmStats { vcpus })
    }

    fn discover(&mut self) -> Result<(), StatsError> {
        let pid = self.pid;
        let dir = format!("/proc/{pid}/fd");
        let entries = fs::read_dir(&dir).map_err(|source| StatsError::Proc { pid, source })?;
        let mut wanted = Vec::new();
        for e in entries.flatten() {
            let Ok(target) = fs::read_link(e.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(id) = target.strip_prefix("anon_inode:kvm-vcpu:") else {
                continue;
            };
            let (Ok(id), Ok(fd)) = (id.parse::<u32>(), e.file_name().to_string_lossy().parse())
            else {
                continue;
            };
            if !self.vcpus.contains_key(&id) {
                wanted.push((id, fd));
            }
        }
        if wanted.is_empty() && self.vcpus.is_empty() {
            return Err(StatsError::NoVcpus(pid));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let pidfd = pidfd_open(pid)?;
        for (id, fd) in wanted {
            let vcpu = pidfd_getfd(&pidfd, fd)?;
            // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
            let stats = unsafe { kvm_get_stats_fd(vcpu.as_raw_fd()) }
                .map_err(|e| sys(format!("KVM_GET_STATS_FD on vCPU {id}"))(e.into()))?;
            // SAFETY: the ioctl returned a new file descriptor that nothing else owns.
            let stats = unsafe { File::from_raw_fd(stats) };
            self.vcpus.insert(id, stats);
        }
        Ok(())
    }
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, StatsError> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(sys(format!("pidfd_open({pid})"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> Result<OwnedFd, StatsError> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(sys(format!("pidfd_getfd(fd {target})"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn read_stats(f: &File) -> Result<BTreeMap<String, u64>, StatsError> {
    let mut header = [0u8; HEADER_LEN];
    f.read_exact_at(&mut header, 0)
        .map_err(sys("reading the stats header"))?;
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let name_size = u32_at(&header, 4) as usize;
    let num_desc = u32_at(&header, 8) as usize;
    let desc_offset = u32_at(&header, 16) as u64;
    let data_offset = u32_at(&header, 20) as u64;
    let mut descs = vec![0u8; num_desc * (DESC_FIXED_LEN + name_size)];
    f.read_exact_at(&mut descs, desc_offset)
        .map_err(sys("reading the stats descriptors"))?;
    let data_len = descs
        .chunks(DESC_FIXED_LEN + name_size)
        .map(|d| {
            let size = u16::from_ne_bytes([d[6], d[7]]) as usize;
            u32_at(d, 8) as usize + 8 * size
        })
        .max()
        .unwrap_or(0);
    let mut data = vec![0u8; data_len];
    f.read_exact_at(&mut data, data_offset)
        .map_err(sys("reading the stats data"))?;
    parse_stats(&descs, name_size, &data)
}

/// Decodes descriptors (`struct kvm_stats_desc` with `name_size`-byte names) and the data
/// block into scalar statistics by name.
pub fn parse_stats(
    descs: &[u8],
    name_size: usize,
    data: &[u8],
) -> Result<BTreeMap<String, u64>, StatsError> {
    let mut out = BTreeMap::new();
    if name_size == 0 {
        return Err(StatsError::Malformed("zero name size"));
    }
    for d in descs.chunks(DESC_FIXED_LEN + name_size) {
        if d.len() != DESC_FIXED_LEN + name_size {
            return Err(StatsError::Malformed("truncated descriptor"));
        }
        let flags = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
        let size = u16::from_ne_bytes([d[6], d[7]]) as usize;
        let offset = u32::from_ne_bytes([d[8], d[9], d[10], d[11]]) as usize;
        let name = &d[DESC_FIXED_LEN..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let name = String::from_utf8_lossy(name).into_owned();
        let kind = flags & KVM_STATS_TYPE_MASK;
        if size != 1 || kind == KVM_STATS_TYPE_LINEAR_HIST || kind == KVM_STATS_TYPE_LOG_HIST {
            continue;
        }
        let v = data
            .get(offset..offset + 8)
            .ok_or(StatsError::Malformed("value outside the data block"))?;
        let v = u64::from_ne_bytes(v.try_into().map_err(|_| StatsError::Malformed("value"))?);
        out.insert(name, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend(flags.to_ne_bytes());
        d.extend(0i16.to_ne_bytes());
        d.extend(size.to_ne_bytes());
        d.extend(offset.to_ne_bytes());
        d.extend(0u32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend(n);
        d
    }

    #[test]
    fn decodes_scalars_and_skips_histograms() {
        let ns = 48;
        let mut descs = desc(0, 1, 0, "exits", ns);
        descs.extend(desc(3, 32, 8, "halt_poll_hist", ns));
        descs.extend(desc(0x30, 1, 8 + 256, "exit_cycles", ns));
        let mut data = vec![0u8; 8 + 256 + 8];
        data[..8].copy_from_slice(&42u64.to_ne_bytes());
        data[264..].copy_from_slice(&123_456_789_012u64.to_ne_bytes());
        let s = parse_stats(&descs, ns, &data).unwrap();
        assert_eq!(s.get("exits"), Some(&42));
        assert_eq!(s.get("exit_cycles"), Some(&123_456_789_012));
        assert!(!s.contains_key("halt_poll_hist"));
    }

    #[test]
    fn rejects_out_of_range_values() {
        let descs = desc(0, 1, 64, "exits", 16);
        assert!(matches!(
            parse_stats(&descs, 16, &[0u8; 8]),
            Err(StatsError::Malformed(_))
        ));
    }
}
