//! The contract between `labctl` (the host) and the lab's guests (the L1 lab host and the
//! L2 test VM), defined once and used by both ends:
//!
//! - [`leaf`]: the CPUID leaf `0x4FFFFFFF` and the line `test_assignment2` prints;
//! - [`reasons`]: exit reasons numbered and named (SDM and SVM), and the line
//!   `test_assignment3` prints for each;
//! - [`job`]: what a VM is asked to do (host → L1 → L2, shipped inside the initramfs);
//! - [`msg`]: what VMs report back (L2 → L1 → host, JSON lines on the second serial port);
//! - [`vm`]: how a lab VM is launched (QEMU arguments, serial port layout, kernel command line);
//! - [`cpio`]: the initramfs format both ends write.

pub mod cpio;
pub mod job;
pub mod leaf;
pub mod msg;
pub mod reasons;
pub mod stress;
pub mod vm;

pub use leaf::{ExitStats, LEAF};
