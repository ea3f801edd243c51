//! Embeds libtorch's rpath into the `iro` binary (see build/libtorch_rpath.rs).
include!("build/libtorch_rpath.rs");

fn main() {
    emit_libtorch_link_args();
}
