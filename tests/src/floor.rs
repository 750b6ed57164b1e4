//! The physical floor of the benchmark: an empty classifier and an empty raw tracepoint
//! program, two instructions each, loaded and attached with the raw `bpf` syscall so
//! that their cost is the kernel's own per-event overhead and nothing of ours.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// `r0 = imm; exit`
fn return_imm(imm: i32) -> [u64; 2] {
    // BPF_ALU64 | BPF_MOV | BPF_K (0xb7), dst r0; then BPF_JMP | BPF_EXIT (0x95).
    let mov = 0xb7u64 | (u64::from(imm.cast_unsigned()) << 32);
    [mov, 0x95]
}

fn bpf(cmd: libc::c_long, attr: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

fn put(attr: &mut [u8], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

fn load(prog_type: u32, name: &str, imm: i32) -> io::Result<OwnedFd> {
    let insns = return_imm(imm);
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &prog_type.to_ne_bytes());
    put(&mut attr, 4, &2u32.to_ne_bytes());
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    // prog_name at offset 48, 16 bytes with the NUL.
    let n = name.len().min(15);
    put(&mut attr, 48, &name.as_bytes()[..n]);
    bpf(BPF_PROG_LOAD, &attr)
}

/// An empty classifier (returns TCX "next") attached to `ifindex`; detached on drop.
pub struct FloorClassifier {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl FloorClassifier {
    pub fn attach(ifindex: u32, attach_type: u32) -> io::Result<Self> {
        let prog = load(BPF_PROG_TYPE_SCHED_CLS, "floor_tc", -1)?;
        let mut attr = [0u8; 64];
        put(
            &mut attr,
            0,
            &u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&prog))
                .map_err(io::Error::other)?
                .to_ne_bytes(),
        );
        put(&mut attr, 4, &ifindex.to_ne_bytes());
        put(&mut attr, 8, &attach_type.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &attr)?;
        Ok(Self {
            _prog: prog,
            _link: link,
        })
    }
}

/// An empty raw tracepoint program on `name`; detached on drop.
pub struct FloorTracepoint {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl FloorTracepoint {
    pub fn attach(name: &str) -> io::Result<Self> {
        let prog = load(BPF_PROG_TYPE_RAW_TRACEPOINT, "floor_tp", 0)?;
        let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // raw_tracepoint: { u64 name; u32 prog_fd; }
        let mut attr = [0u8; 16];
        put(&mut attr, 0, &(name.as_ptr() as u64).to_ne_bytes());
        put(
            &mut attr,
            8,
            &u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&prog))
                .map_err(io::Error::other)?
                .to_ne_bytes(),
        );
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)?;
        Ok(Self {
            _prog: prog,
            _link: link,
        })
    }
}
