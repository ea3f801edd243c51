//! Embeds libtorch's rpath into the worker's test binaries (see build/libtorch_rpath.rs).
include!("../build/libtorch_rpath.rs");

fn main() {
    emit_libtorch_link_args();
}
