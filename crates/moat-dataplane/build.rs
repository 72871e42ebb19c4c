//! Builds the BPF crate (moat-ebpf) with the nightly toolchain for the BPF
//! target and places the object in OUT_DIR, where `include_bytes!` finds it.

fn main() {
    let ebpf = aya_build::Package {
        name: "moat-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../moat-ebpf"),
        no_default_features: false,
        features: &[],
    };
    println!("cargo:rerun-if-changed=../moat-common/src");
    if let Err(e) = aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly) {
        panic!("building the BPF program failed (run scripts/setup.sh first): {e:#}");
    }
}
