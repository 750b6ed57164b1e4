//! The `bpf(2)` syscall for what aya 0.14 lacks (batched lookups, feature probes, the
//! benchmark's bare programs), in one style: each command's member of `union bpf_attr`
//! as a `repr(C)` struct of its own, passed with its own size. The kernel reads that
//! many bytes and takes the rest of the union as zero.

use std::{
    ffi::CStr,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

/// The commands used here, as `enum bpf_cmd` numbers them.
pub mod cmd {
    pub const MAP_CREATE: libc::c_long = 0;
    pub const MAP_LOOKUP_ELEM: libc::c_long = 1;
    pub const MAP_UPDATE_ELEM: libc::c_long = 2;
    pub const MAP_DELETE_ELEM: libc::c_long = 3;
    pub const PROG_LOAD: libc::c_long = 5;
    pub const PROG_QUERY: libc::c_long = 16;
    pub const RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    pub const MAP_LOOKUP_BATCH: libc::c_long = 24;
    pub const LINK_CREATE: libc::c_long = 28;
}

/// The syscall with `attr`, a member of `union bpf_attr`: what it returns (a new file
/// descriptor for the commands that make one, else 0).
pub fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<u32> {
    // SAFETY: `attr` is a member of `union bpf_attr` of the size passed, whose pointers
    // the caller keeps alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    u32::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// `bpf` for a command that makes a file descriptor: the descriptor, owned.
pub fn bpf_fd<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<OwnedFd> {
    let fd = i32::try_from(bpf(cmd, attr)?).map_err(io::Error::other)?;
    // SAFETY: a new file descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `elem` member: one map element.
#[repr(C)]
#[derive(Default)]
pub struct ElemAttr {
    pub map_fd: u32,
    pub pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

/// The `batch` member: map elements a chunk at a time.
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// The prog-load member, to its expected attach type.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a GPL program of `insns` (each `code | dst << 8 | src << 12 | off << 16 |
/// imm << 32`), of `prog_type`, for `attach_type`, named `name` (cut to 15 bytes).
pub fn load_program(
    prog_type: u32,
    attach_type: u32,
    name: &str,
    insns: &[u64],
) -> io::Result<OwnedFd> {
    const LICENSE: &CStr = c"GPL";
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).map_err(io::Error::other)?,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    bpf_fd(cmd::PROG_LOAD, &mut attr)
}

const _: () = assert!(std::mem::offset_of!(ProgLoadAttr, prog_name) == 48);
const _: () = assert!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type) == 68);
const _: () = assert!(size_of::<BatchAttr>() == 56);
const _: () = assert!(size_of::<ElemAttr>() == 32);
