//! The classifiers driven with crafted and random packets through `BPF_PROG_TEST_RUN`:
//! the real programs in the real kernel, with their maps read back. One binary (the
//! kernel matrix's arm64 guests run it), a module a subject, over one harness and one
//! set of frame builders.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/src/root.rs"]
mod root;

mod frames;
mod harness;

mod cpus;
mod dns;
mod dns_tcp;
mod flows;
mod linklocal;
mod recent;
