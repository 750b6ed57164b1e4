//! The physical floor of the benchmark: an empty classifier and an empty raw tracepoint
//! program, two instructions each, loaded and attached with the raw `bpf` syscall so
//! that their cost is the kernel's own per-event overhead and nothing of ours. And a
//! classifier that reads two bytes of the headers and nothing else, put in front of the
//! agent's: what the first touch of a packet's header line costs whoever reads it first.

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

/// Reads the ethertype and an IPv4 TCP header's flags byte when the linear data holds
/// them, then returns TCX "next": `r2 = data; r3 = data_end; if r2 + 48 > r3 goto out;
/// r5 = byte 12; r5 = byte 47; out: r0 = -1; exit`.
fn read_headers() -> [u64; 9] {
    // opcode | dst << 8 | src << 12 | off << 16 | imm << 32
    let insn = |op: u64, dst: u64, src: u64, off: u16, imm: i32| {
        op | dst << 8 | src << 12 | u64::from(off) << 16 | u64::from(imm.cast_unsigned()) << 32
    };
    [
        insn(0x61, 2, 1, 76, 0), // r2 = *(u32 *)(r1 + data)
        insn(0x61, 3, 1, 80, 0), // r3 = *(u32 *)(r1 + data_end)
        insn(0xbf, 4, 2, 0, 0),  // r4 = r2
        insn(0x07, 4, 0, 0, 48), // r4 += 48
        insn(0x2d, 4, 3, 2, 0),  // if r4 > r3 goto +2
        insn(0x71, 5, 2, 12, 0), // r5 = *(u8 *)(r2 + 12)
        insn(0x71, 5, 2, 47, 0), // r5 = *(u8 *)(r2 + 47)
        insn(0xb7, 0, 0, 0, -1), // r0 = -1
        insn(0x95, 0, 0, 0, 0),  // exit
    ]
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
    load_insns(prog_type, name, &return_imm(imm))
}

fn load_insns(prog_type: u32, name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &prog_type.to_ne_bytes());
    let count = u32::try_from(insns.len()).map_err(io::Error::other)?;
    put(&mut attr, 4, &count.to_ne_bytes());
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

/// Where a classifier goes among those on the hook.
#[derive(Clone, Copy)]
pub enum Place {
    /// After every classifier there (the agent's among them).
    Last,
    /// Before every classifier there.
    First,
}

/// TCX's `BPF_F_BEFORE`: with no relative program, the front of the hook.
const BPF_F_BEFORE: u32 = 1 << 3;

impl FloorClassifier {
    /// The empty classifier, named `floor_tc`, last on the hook.
    pub fn attach(ifindex: u32, attach_type: u32) -> io::Result<Self> {
        Self::attach_program(
            ifindex,
            attach_type,
            "floor_tc",
            &return_imm(-1),
            Place::Last,
        )
    }

    /// The empty classifier under a name of its own (to tell directions apart).
    pub fn attach_named(ifindex: u32, attach_type: u32, name: &str) -> io::Result<Self> {
        Self::attach_program(ifindex, attach_type, name, &return_imm(-1), Place::Last)
    }

    /// The classifier that reads two bytes of the headers (`read_headers`), named `name`.
    pub fn attach_reader(
        ifindex: u32,
        attach_type: u32,
        name: &str,
        place: Place,
    ) -> io::Result<Self> {
        Self::attach_program(ifindex, attach_type, name, &read_headers(), place)
    }

    fn attach_program(
        ifindex: u32,
        attach_type: u32,
        name: &str,
        insns: &[u64],
        place: Place,
    ) -> io::Result<Self> {
        let prog = load_insns(BPF_PROG_TYPE_SCHED_CLS, name, insns)?;
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
        if let Place::First = place {
            put(&mut attr, 12, &BPF_F_BEFORE.to_ne_bytes());
        }
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
