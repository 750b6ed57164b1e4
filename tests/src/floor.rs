//! The physical floor of the benchmark: an empty classifier and an empty raw tracepoint
//! program, two instructions each, loaded and attached with the raw `bpf` syscall so
//! that their cost is the kernel's own per-event overhead and nothing of ours. And a
//! classifier that reads two bytes of the headers and nothing else, put in front of the
//! agent's: what the first touch of a packet's header line costs whoever reads it first.

use std::{io, os::fd::OwnedFd};

use monitor::kernel::bpf::{ElemAttr, bpf, bpf_fd, cmd, load_program};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// opcode | dst << 8 | src << 12 | off << 16 | imm << 32
fn insn(op: u64, dst: u64, src: u64, off: i16, imm: i32) -> u64 {
    op | dst << 8
        | src << 12
        | u64::from(off.cast_unsigned()) << 16
        | u64::from(imm.cast_unsigned()) << 32
}

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

fn load(prog_type: u32, name: &str, imm: i32) -> io::Result<OwnedFd> {
    load_insns(prog_type, name, &return_imm(imm))
}

fn load_insns(prog_type: u32, name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    load_program(prog_type, 0, name, insns)
}

/// The link-create member of `union bpf_attr`, for a TCX link.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    /// The interface's index.
    target: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    pad: u32,
    expected_revision: u64,
}

/// The link-create member, for a netfilter link.
#[repr(C)]
#[derive(Default)]
struct NetfilterLinkAttr {
    prog_fd: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    nf_flags: u32,
}

/// The raw-tracepoint-open member.
#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    pad: u32,
}

/// The map-create member, to its first four words.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn raw_fd(fd: &OwnedFd) -> io::Result<u32> {
    u32::try_from(std::os::fd::AsRawFd::as_raw_fd(fd)).map_err(io::Error::other)
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
        let mut attr = LinkCreateAttr {
            prog_fd: raw_fd(&prog)?,
            target: ifindex,
            attach_type,
            flags: match place {
                Place::First => BPF_F_BEFORE,
                Place::Last => 0,
            },
            ..LinkCreateAttr::default()
        };
        let link = bpf_fd(cmd::LINK_CREATE, &mut attr)?;
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
        let mut attr = RawTracepointAttr {
            name: name.as_ptr() as u64,
            prog_fd: raw_fd(&prog)?,
            pad: 0,
        };
        let link = bpf_fd(cmd::RAW_TRACEPOINT_OPEN, &mut attr)?;
        Ok(Self {
            _prog: prog,
            _link: link,
        })
    }
}

const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_NETFILTER: u32 = 32;
const BPF_NETFILTER: u32 = 45;
const NFPROTO_IPV4: u32 = 2;
pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_OUT: u32 = 3;
/// A bracket's reading above this is a preemption or a migration, not the hooks' work.
const BRACKET_MAX_NS: i32 = 100_000;

/// Brackets of netfilter hooks: for each pair of priorities, a program at the first
/// that takes the time and one at the second that adds what passed since to the pair's
/// sum and counts the packet, on every hook given. What a pair measures is the hooks
/// registered between its priorities (`nf_conntrack`'s lookup at -200, say) plus the
/// brackets' own overhead, which a pair with nothing between gives. Attached in the
/// calling thread's network namespace; detached on drop.
pub struct HookTimer {
    map: OwnedFd,
    _progs: Vec<OwnedFd>,
    _links: Vec<OwnedFd>,
}

impl HookTimer {
    pub fn attach(hooks: &[u32], pairs: &[(i32, i32)]) -> io::Result<Self> {
        let slots = u32::try_from(pairs.len() * 3).map_err(io::Error::other)?;
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: slots,
        };
        let map = bpf_fd(cmd::MAP_CREATE, &mut attr)?;
        let fd = raw_fd(&map)?.cast_signed();
        let (mut progs, mut links) = (Vec::new(), Vec::new());
        for (i, &(first, second)) in pairs.iter().enumerate() {
            let base = i32::try_from(i * 3).map_err(io::Error::other)?;
            for (prio, insns) in [
                (first, bracket_start(fd, base)),
                (second, bracket_stop(fd, base)),
            ] {
                let prog =
                    load_program(BPF_PROG_TYPE_NETFILTER, BPF_NETFILTER, "hook_timer", &insns)?;
                for &hook in hooks {
                    let mut attr = NetfilterLinkAttr {
                        prog_fd: raw_fd(&prog)?,
                        attach_type: BPF_NETFILTER,
                        pf: NFPROTO_IPV4,
                        hooknum: hook,
                        priority: prio,
                        ..NetfilterLinkAttr::default()
                    };
                    links.push(bpf_fd(cmd::LINK_CREATE, &mut attr)?);
                }
                progs.push(prog);
            }
        }
        Ok(Self {
            map,
            _progs: progs,
            _links: links,
        })
    }

    /// Pair `pair`'s nanoseconds and packets so far, over every CPU.
    pub fn read(&self, pair: usize) -> io::Result<(u64, u64)> {
        let base = u32::try_from(pair * 3).map_err(io::Error::other)?;
        Ok((self.slot(base + 1)?, self.slot(base + 2)?))
    }

    fn slot(&self, key: u32) -> io::Result<u64> {
        let cpus = possible_cpus()?;
        let mut values = vec![0u64; cpus];
        let mut attr = ElemAttr {
            map_fd: raw_fd(&self.map)?,
            key: &raw const key as u64,
            value: values.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf(cmd::MAP_LOOKUP_ELEM, &mut attr)?;
        Ok(values.iter().sum())
    }
}

/// How many CPUs a per-CPU map holds a value for: `/sys/devices/system/cpu/possible`.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for range in text.trim().split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (usize, usize) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        n = n.max(b + 1).max(a + 1);
    }
    Ok(n)
}

/// `*(u32 *)(r10 - 4) = key; r1 = map; r2 = r10 - 4; call map_lookup_elem`
fn lookup(map_fd: i32, key: i32) -> [u64; 6] {
    [
        insn(0x62, 10, 0, -4, key),  // *(u32 *)(r10 - 4) = key
        insn(0x18, 1, 1, 0, map_fd), // r1 = map (BPF_PSEUDO_MAP_FD)
        0,
        insn(0xbf, 2, 10, 0, 0), // r2 = r10
        insn(0x07, 2, 0, 0, -4), // r2 += -4
        insn(0x85, 0, 0, 0, 1),  // call map_lookup_elem
    ]
}

/// `r0 = NF_ACCEPT; exit`
const ACCEPT: [u64; 2] = [0xb7 | 1 << 32, 0x95];

/// Stores `bpf_ktime_get_ns()` in slot `base`.
fn bracket_start(map_fd: i32, base: i32) -> Vec<u64> {
    let mut p = vec![
        insn(0x85, 0, 0, 0, 5), // call ktime_get_ns
        insn(0xbf, 6, 0, 0, 0), // r6 = r0
    ];
    p.extend(lookup(map_fd, base));
    p.push(insn(0x15, 0, 0, 1, 0)); // if r0 == 0 goto +1
    p.push(insn(0x7b, 0, 6, 0, 0)); // *(u64 *)(r0 + 0) = r6
    p.extend(ACCEPT);
    p
}

/// Takes the time since slot `base`'s (clearing it), adds it to slot `base + 1` and one
/// to slot `base + 2`; a reading with no start, or past `BRACKET_MAX_NS`, is left out.
fn bracket_stop(map_fd: i32, base: i32) -> Vec<u64> {
    let mut p = vec![
        insn(0x85, 0, 0, 0, 5), // call ktime_get_ns
        insn(0xbf, 6, 0, 0, 0), // r6 = r0
    ];
    // Jumps to the end, patched once its place is known.
    let mut outs = Vec::new();
    let mut out = |p: &mut Vec<u64>, op: u64, dst: u64, imm: i32| {
        outs.push(p.len());
        p.push(insn(op, dst, 0, 0, imm));
    };
    p.extend(lookup(map_fd, base));
    out(&mut p, 0x15, 0, 0); // if r0 == 0 goto out
    p.push(insn(0x79, 7, 0, 0, 0)); // r7 = *(u64 *)(r0 + 0)
    out(&mut p, 0x15, 7, 0); // if r7 == 0 goto out
    p.push(insn(0x7a, 0, 0, 0, 0)); // *(u64 *)(r0 + 0) = 0
    p.push(insn(0x1f, 6, 7, 0, 0)); // r6 -= r7
    out(&mut p, 0x25, 6, BRACKET_MAX_NS); // if r6 > max goto out
    for (slot, add_time) in [(base + 1, true), (base + 2, false)] {
        p.extend(lookup(map_fd, slot));
        out(&mut p, 0x15, 0, 0); // if r0 == 0 goto out
        p.push(insn(0x79, 1, 0, 0, 0)); // r1 = *(u64 *)(r0 + 0)
        p.push(if add_time {
            insn(0x0f, 1, 6, 0, 0) // r1 += r6
        } else {
            insn(0x07, 1, 0, 0, 1) // r1 += 1
        });
        p.push(insn(0x7b, 0, 1, 0, 0)); // *(u64 *)(r0 + 0) = r1
    }
    let end = p.len();
    for at in outs {
        let off = i16::try_from(end - at - 1).unwrap();
        p[at] |= u64::from(off.cast_unsigned()) << 16;
    }
    p.extend(ACCEPT);
    p
}
