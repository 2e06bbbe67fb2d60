//! `labctl build`: the pipeline up to the images, without booting (kernel, selftest,
//! guest programs, L1 image), and where each artifact is.

use anyhow::Result;

use crate::engine::Lab;
use crate::kernel::KernelDirs;

pub fn run(lab: &Lab) -> Result<i32> {
    let p = lab.build()?;
    println!("kernel: {}", p.kernel.display());
    println!("image:  {}", p.image.display());
    if let Some(b) = p.build {
        println!(
            "info:   {}",
            KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series)
                .info()
                .display()
        );
        println!(
            "Linux {} + {} patches from {}",
            b.version,
            b.patches.len(),
            b.source
        );
    }
    Ok(0)
}
