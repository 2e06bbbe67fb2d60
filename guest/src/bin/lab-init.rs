//! PID 1 of the lab's L1 and L2 images (see `exitlab_guest::init`).

fn main() {
    exitlab_guest::init::main()
}
