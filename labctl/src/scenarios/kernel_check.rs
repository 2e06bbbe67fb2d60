//! `labctl kernel-check`: the kernel quality gate (checkpatch --strict on every patch,
//! `make W=1 arch/x86/kvm/` with VMX and SVM), on the lab's kernel series.

use anyhow::Result;

use crate::engine::Lab;
use crate::error::code;
use crate::kernel::{self, KernelDirs};

pub fn run(lab: &Lab) -> Result<i32> {
    lab.build()?;
    let dirs = KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series);
    let patches = kernel::lab_kernel_patches(&lab.repo, lab.cfg.kernel_series)?;
    let results = kernel::quality_gate(&lab.sh, &dirs, &patches)?;
    for r in &results {
        println!("{} {}", if r.ok { "ok  " } else { "FAIL" }, r.name);
        if !r.ok {
            println!("{}", r.detail);
        }
    }
    Ok(code::of_checks(results.iter().all(|r| r.ok)))
}
