//! The kernel matrix's rows, written once: `cargo xtask setup` fetches each row's kernel
//! (it includes this very file, which needs the standard library alone),
//! `tests/tests/kernels.rs` boots each and holds it to what the row says, and a test
//! checks that README's Kernels table names each.

/// One kernel of the matrix.
#[derive(Clone, Copy, Debug)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each a fact of the kernel the test asserts on its own"
)]
pub struct Row {
    /// The directory under `target/kernels`, and the row's name.
    pub name: &'static str,
    /// The Debian suite whose `linux-image-cloud-*` it is.
    pub suite: &'static str,
    /// An arm64 kernel (booted with `qemu-system-aarch64`), else an `x86_64` one.
    pub arm64: bool,
    /// Booted with `lockdown=integrity`, as AL2023 and Bottlerocket run.
    pub lockdown: bool,
    /// The kernel's version string starts with this.
    pub release: &'static str,
    /// TCX (6.6+): classifiers attach without clsact and die with the agent.
    pub tcx: bool,
    /// `bpf_loop` (5.17+): every DNS message of a TCP segment is read.
    pub bpf_loop: bool,
    /// The drop reason the kernel gives a datagram to a closed port.
    pub no_socket: &'static str,
}

const fn row(name: &'static str, suite: &'static str, arm64: bool, release: &'static str) -> Row {
    // What each kernel has follows from its version: reasons from 5.17, TCX from 6.6.
    let old = matches!(release.as_bytes(), b"5.10.");
    let tcx = matches!(release.as_bytes(), b"6.12.");
    Row {
        name,
        suite,
        arm64,
        lockdown: !old,
        release,
        tcx,
        bpf_loop: !old,
        no_socket: if old { "unknown" } else { "NO_SOCKET" },
    }
}

/// Every row, `x86_64` first.
pub const ROWS: [Row; 6] = [
    row("5.10", "bullseye", false, "5.10."),
    row("6.1", "bookworm", false, "6.1."),
    row("6.12", "bookworm-backports", false, "6.12."),
    row("arm64-5.10", "bullseye", true, "5.10."),
    row("arm64-6.1", "bookworm", true, "6.1."),
    row("arm64-6.12", "bookworm-backports", true, "6.12."),
];

/// The row named `name`.
pub fn named(name: &str) -> Row {
    ROWS.iter()
        .copied()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no kernel {name} in the matrix"))
}
