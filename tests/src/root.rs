//! Whether a root-only test may run: shared by the integration tests and the probe tests
//! of `monitor` (which include this file, so that they build for aarch64 without the
//! integration tests' other dependencies and run on the arm64 guests).

/// Whether a root-only test may run. Outside CI a non-root run skips with a message;
/// in CI it fails, so a misconfigured runner cannot pass by skipping.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it"
    );
    eprintln!("skipping {test}: needs root (network namespaces, eBPF)");
    false
}
