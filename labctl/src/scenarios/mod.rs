//! One file per subcommand, each the same shape: its options (a clap `Args` type, or the
//! shared `LabArgs`) → a request checked for bad input → the job L1 and L2 run
//! (`exitlab_proto::job`) → `engine::Lab::run` → checks (`crate::verify`) → results
//! (`crate::report`), written and summarized. What several scenarios share is in the
//! engine, not here; a scenario may reuse another's steps (host-recipe runs the lab's).

pub mod bench;
pub mod build;
pub mod compare_paging;
pub mod exec;
pub mod host_recipe;
pub mod kernel_check;
pub mod kvm_selftests;
pub mod lab;
pub mod record_boot;
pub mod selftest;
pub mod soak;
pub mod stress;
