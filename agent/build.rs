//! Builds the eBPF programs in `agent-ebpf` for the BPF target with the nightly toolchain,
//! so the agent can embed them. Needs `rust-src` for nightly and `bpf-linker` on PATH:
//! `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "tokenmesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        no_default_features: true,
        features: &["programs"],
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
