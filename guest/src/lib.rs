//! Code that runs inside the lab's VMs. Every binary here is built static
//! (`-C target-feature=+crt-static`) so it runs in any x86-64 guest with no libraries.

pub mod init;
pub mod kvmstats;
mod l2;
pub mod leaf;
pub mod port;
mod sampler;
