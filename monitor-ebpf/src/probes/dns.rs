//! DNS over UDP and TCP: queries, responses matched to their query by (client, client
//! port, server, id, transport), latency, and the queries still in flight for the agent
//! to time out; TCP connections to port 53 refused or left unanswered.
//! Everything is counted by (device, resolver slot): a slot the agent gave the server,
//! or `other`. No key is ever chosen by what a packet holds beyond those bounds.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::bpf_loop,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use monitor_common::{
    Addr, AddrInfo, BPF_F_NO_PREALLOC, DNS_COUNTS_MAX_ENTRIES, DNS_FLIGHT_KEY_WORDS,
    DNS_INFLIGHT_MAX_ENTRIES, DNS_LATENCY_BOUNDS_NS, DNS_LATENCY_BUCKETS, DNS_LATENCY_MAX_ENTRIES,
    DNS_SEEN_MAX_ENTRIES, DNS_TCP, DNS_UDP, DnsCountKey, DnsCountKind, DnsFlight, DnsFlightKey,
    DnsLatency, DnsSlotKey, FLIGHT_CONNECT, MapFull, RESOLVER_OTHER,
    proto::{DNS_HLEN, DNS_PORT, TCP_ACK, TCP_DATA_OFFSET, TCP_RST, TCP_SEQ, TCP_SYN, UDP_HLEN},
};

use super::packet::{Packet, read};
use crate::{
    kernel::now_ns,
    maps::{BPF_NOEXIST, EEXIST, addr_info, increment, map_full},
    tables::{clients, pending},
};

/// The QR bit of a DNS header's flags: a response.
const DNS_QR: u16 = 0x8000;

/// Queries, responses by rcode, and queries ended to make room or by a copy, per CPU.
#[map]
static DNS_COUNTS: PerCpuHashMap<DnsCountKey, u64> =
    PerCpuHashMap::with_max_entries(DNS_COUNTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static DNS_LATENCY: PerCpuHashMap<DnsSlotKey, DnsLatency> =
    PerCpuHashMap::with_max_entries(DNS_LATENCY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Queries awaiting a response. The agent deletes those older than `--dns-timeout`
/// and counts them unanswered; whoever deletes an entry first counts it, so a query is
/// either answered or unanswered, never both. Preallocated (1.8 MiB): a query inserts
/// on one CPU and its response deletes on another, which through the run-time
/// allocator's per-CPU caches cost twice as much (measured under dnsperf).
#[map]
static DNS_INFLIGHT: HashMap<DnsFlightKey, DnsFlight> =
    HashMap::with_max_entries(DNS_INFLIGHT_MAX_ENTRIES, 0);

/// What the agent counts itself (queries its sweep found unanswered, and the counts of
/// resolvers that gave their slot up, moved to `other`): written by the agent only, here
/// so that they are pinned with the rest and survive the agent.
#[map]
static DNS_AGENT_COUNTS: HashMap<DnsCountKey, u64> =
    HashMap::with_max_entries(DNS_COUNTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Latency of resolvers that gave their slot up, moved to `other`: the agent's, pinned.
#[map]
static DNS_AGENT_LATENCY: HashMap<DnsSlotKey, DnsLatency> =
    HashMap::with_max_entries(DNS_LATENCY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Servers without a slot that queries went to, with a rough count: what the agent
/// names its next resolvers from. Least recently used out first: a pod spraying
/// addresses churns it, a busy resolver stays.
#[map]
static DNS_SEEN: LruHashMap<Addr, u64> = LruHashMap::with_max_entries(DNS_SEEN_MAX_ENTRIES, 0);

/// The bits of a DNS header's flags word.
const DNS_OPCODE_SHIFT: u16 = 11;
const DNS_OPCODE_MASK: u16 = 0x0f;
const DNS_RCODE_MASK: u16 = 0x0f;

/// A query's device, resolver slot, direction and what it is, kept with it while it
/// waits.
#[derive(Clone, Copy)]
pub struct Meta {
    pub ifindex: u32,
    pub resolver: u8,
    pub egress: u8,
    /// `DNS_UDP` or `DNS_TCP` for a query, `FLIGHT_CONNECT` for a connection.
    pub what: u8,
}

/// What recording a query or a connection in flight ended: a kind (`ENDED_*`) and, for
/// a query it ended, that query's device, slot and direction. A struct with every field
/// always written, not an enum with a payload on some variants: the verifier refuses a
/// register or stack slot that was never written, which an enum's unused payload is
/// where it crosses a function call.
#[derive(Clone, Copy)]
pub struct Ended {
    kind: u8,
    meta: Meta,
}

/// Nothing ended.
const ENDED_NONE: u8 = 0;
/// A copy of the new query, still waiting, that it replaced.
const ENDED_SUPERSEDED: u8 = 1;
/// A query the table could not keep to its end: the new one (its client at its share,
/// or no way it may take), or the one of a full set's heaviest client whose way it took.
/// Counted untracked, never unanswered.
const ENDED_EVICTED: u8 = 2;
/// The same query or connection already waits, and keeps its place: a TCP segment sent
/// again, or a SYN retransmitted. Nothing new is counted.
const ENDED_WAITING: u8 = 3;

impl Ended {
    const NOTHING: Meta = Meta {
        ifindex: 0,
        resolver: 0,
        egress: 0,
        what: 0,
    };

    #[inline(always)]
    pub(crate) fn none() -> Self {
        Self {
            kind: ENDED_NONE,
            meta: Self::NOTHING,
        }
    }

    #[inline(always)]
    pub(crate) fn waiting() -> Self {
        Self {
            kind: ENDED_WAITING,
            meta: Self::NOTHING,
        }
    }

    #[inline(always)]
    pub(crate) fn superseded(meta: Meta) -> Self {
        Self {
            kind: ENDED_SUPERSEDED,
            meta,
        }
    }

    #[inline(always)]
    pub(crate) fn evicted(meta: Meta) -> Self {
        Self {
            kind: ENDED_EVICTED,
            meta,
        }
    }
}

/// A DNS message's header as the probes use it.
#[derive(Clone, Copy)]
struct Header {
    id: u16,
    flags: u16,
    qdcount: u16,
}

impl Header {
    #[inline(always)]
    fn parse(h: &[u8]) -> Option<Self> {
        Some(Self {
            id: u16::from_be_bytes([*h.first()?, *h.get(1)?]),
            flags: u16::from_be_bytes([*h.get(2)?, *h.get(3)?]),
            qdcount: u16::from_be_bytes([*h.get(4)?, *h.get(5)?]),
        })
    }
}

/// A DNS message over UDP. `far` is what the agent told of the packet's far end.
#[inline(always)]
pub fn handle(ctx: &TcContext, p: &Packet, ifindex: u32, egress: bool, far: AddrInfo) {
    // In place where the linear data holds it, else copied out (a helper call).
    let off = p.l4 + UDP_HLEN;
    let Some(hdr) =
        read::<[u8; DNS_HLEN]>(ctx, off).or_else(|| ctx.load::<[u8; DNS_HLEN]>(off).ok())
    else {
        return;
    };
    let Some(h) = Header::parse(&hdr) else { return };
    message(p, h, ifindex, egress, far, DNS_UDP);
}

/// Bytes of a DNS message's length prefix over TCP.
const TCP_LENGTH_PREFIX: usize = 2;
/// The fewest bytes a DNS message over TCP takes: its length prefix and header.
const TCP_MESSAGE_MIN: usize = TCP_LENGTH_PREFIX + DNS_HLEN;
/// DNS messages read of a TCP segment on kernels without `bpf_loop` (before 5.17), a
/// bounded loop the verifier walks message by message (8 or 16 took 5.10's verifier
/// minutes at each start under the kernel matrix's emulation); with it, every one.
const TCP_MESSAGES_BOUNDED: usize = 4;
/// Connections whose next message begins in a later segment (a message ran past the
/// end of its own).
const TCP_SPILLS: u32 = 4096;

/// A TCP connection one way: (source, destination, their ports).
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpWay {
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
}

/// The sequence number each connection's next message begins at, where a message ran
/// past its segment: the next segment is read from there, not taken for the start of a
/// message. Least recently used out first, so bounded whatever pods open.
#[map]
static DNS_TCP_NEXT: LruHashMap<TcpWay, u32> = LruHashMap::with_max_entries(TCP_SPILLS, 0);

/// Segments with DNS messages left unread (past the bounded loop's reach, a header cut
/// by the segment's end, or bytes where a message should begin that do not read as one),
/// per CPU: what is not seen is counted.
#[map]
static DNS_TCP_UNREAD: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where the reading of one segment's DNS messages stands.
#[derive(Clone, Copy)]
struct TcpWalk {
    far: AddrInfo,
    ifindex: u32,
    egress: bool,
    /// Offset of the next message's length prefix, and of the segment's end.
    off: usize,
    end: usize,
    /// Set where the bytes at `off` do not read as a DNS message.
    lost: bool,
}

/// What `bpf_loop` hands its callback, on the classifier's stack: the walk, and the
/// context and packet it reads.
#[repr(C)]
struct TcpLoop {
    skb: *mut __sk_buff,
    p: *const Packet,
    walk: TcpWalk,
}

/// A TCP segment to or from port 53 (`flags` its TCP flags): the connection's opening
/// and refusal, and the DNS messages whose length prefix and header it holds: the first
/// at the start of its payload, or where the connection's previous message ended if
/// that ran past its own segment, and every one that follows in the segment. A message
/// split across segments is counted in the segment that holds its header. A segment
/// that begins inside a message the classifiers did not see begin (a connection older
/// than the agent) has no header at its start to read, and one whose bytes there do
/// not read as a standard query or a response to a query in flight moves no count.
// One body, over 60 lines: the object is held instruction for instruction to the one
// the kernel matrix verified (6.1's verifier walks within a fifth of its budget), and a
// split, even into functions inlined always, compiles to other eBPF.
#[inline(always)]
pub fn handle_tcp(
    ctx: &TcContext,
    p: &Packet,
    flags: u8,
    ifindex: u32,
    egress: bool,
    far: AddrInfo,
) {
    if flags & (TCP_SYN | TCP_RST) != 0 {
        connection(p, flags, ifindex, egress, far);
        return;
    }
    let Some(doff) = read::<u8>(ctx, p.l4 + TCP_DATA_OFFSET)
        .or_else(|| ctx.load::<u8>(p.l4 + TCP_DATA_OFFSET).ok())
    else {
        return;
    };
    let Some(seq) =
        read::<u32>(ctx, p.l4 + TCP_SEQ).or_else(|| ctx.load::<u32>(p.l4 + TCP_SEQ).ok())
    else {
        return;
    };
    let seq = u32::from_be(seq);
    let payload = p.l4 + usize::from(doff >> 4) * 4;
    let end = ctx.len() as usize;
    if payload >= end {
        return;
    }
    let mut off = payload;
    let way = way_of(p);
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    if let Some(next) = unsafe { DNS_TCP_NEXT.get(&way) }.copied() {
        let ahead = next.wrapping_sub(seq);
        // Behind the segment's start (wrapped past half the sequence space) is stale.
        if ahead < 0x8000_0000 {
            if ahead as usize >= end - payload {
                // All of it the tail of the message begun earlier (or a copy of it).
                return;
            }
            off += ahead as usize;
        }
        let _ = DNS_TCP_NEXT.remove(&way);
    }
    let mut walk = TcpWalk {
        far,
        ifindex,
        egress,
        off,
        end,
        lost: false,
    };
    if crate::BPF_LOOP {
        let mut run = TcpLoop {
            skb: ctx.skb.skb,
            p,
            walk,
        };
        // Each message is at least `TCP_MESSAGE_MIN` bytes: as many turns as could
        // begin in the segment, and the callback stops at the last.
        let turns = ((end - off) / TCP_MESSAGE_MIN + 1) as u32;
        // SAFETY: the callback takes the `TcpLoop` it is handed, which outlives the loop.
        unsafe {
            bpf_loop(turns, tcp_step as *mut c_void, (&raw mut run).cast(), 0);
        }
        walk = run.walk;
    } else {
        for _ in 0..TCP_MESSAGES_BOUNDED {
            if !step(ctx, p, &mut walk) {
                break;
            }
        }
    }
    if walk.lost {
        // Bytes that do not read as a DNS message where one should begin: the tail of
        // a message whose start the programs did not see (a connection older than the
        // agent, or one whose place was evicted from `DNS_TCP_NEXT`), or not DNS.
        unread();
    } else {
        ended_at(ctx, &walk, &way, seq, payload);
    }
}

/// `bpf_loop`'s callback: one message of the segment; 1 stops the loop.
#[inline(never)]
extern "C" fn tcp_step(_index: u32, run: *mut c_void) -> i64 {
    // SAFETY: `handle_tcp` hands `bpf_loop` its own `TcpLoop`, alive until the loop ends.
    let run = unsafe { &mut *run.cast::<TcpLoop>() };
    let ctx = TcContext::new(run.skb);
    // SAFETY: the classifier's own `Packet`, alive while it reads the segment.
    let p = unsafe { &*run.p };
    i64::from(!step(&ctx, p, &mut run.walk))
}

/// Reads and counts the message at `walk.off` and moves past it: `false` where none
/// begins there whole (the segment's end, or bytes that do not read as one).
#[inline(always)]
fn step(ctx: &TcContext, p: &Packet, walk: &mut TcpWalk) -> bool {
    let off = walk.off;
    if off + TCP_MESSAGE_MIN > walk.end {
        return false;
    }
    // Copied out (a helper call): the offsets are past what the verifier lets a packet
    // pointer reach, and a callback has no packet pointer of its own.
    let Ok(m) = ctx.load::<[u8; TCP_MESSAGE_MIN]>(off) else {
        walk.lost = true;
        return false;
    };
    let len = usize::from(u16::from_be_bytes([m[0], m[1]]));
    let h = if len < DNS_HLEN {
        // Not a DNS message's length: the segment does not begin with one.
        None
    } else {
        Header::parse(&m[TCP_LENGTH_PREFIX..])
    };
    let Some(h) = h else {
        walk.lost = true;
        return false;
    };
    message(p, h, walk.ifindex, walk.egress, walk.far, DNS_TCP);
    walk.off = off + TCP_LENGTH_PREFIX + len;
    true
}

#[inline(always)]
fn way_of(p: &Packet) -> TcpWay {
    TcpWay {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    }
}

/// Where the reading of connection `way`'s segment that begins at sequence `seq`
/// (payload at `payload`) stopped: a last message that runs on says where the connection's next begins; one
/// left unread, past the loop's bound or with its header cut by the segment's end, is
/// counted.
#[inline(always)]
fn ended_at(ctx: &TcContext, walk: &TcpWalk, way: &TcpWay, seq: u32, payload: usize) {
    let (off, end) = (walk.off, walk.end);
    if off >= end {
        if off > end {
            // The last message runs on in a later segment: read that from its end.
            let next = seq.wrapping_add((off - payload) as u32);
            let _ = DNS_TCP_NEXT.insert(way, &next, 0);
        }
        return;
    }
    if off + TCP_MESSAGE_MIN > end
        && let Ok(prefix) = ctx.load::<[u8; TCP_LENGTH_PREFIX]>(off)
    {
        // A message whose header the segment cuts: unread, but where the next begins is
        // known from its length.
        let len = usize::from(u16::from_be_bytes(prefix));
        if len >= DNS_HLEN {
            let next = seq.wrapping_add((off + TCP_LENGTH_PREFIX + len - payload) as u32);
            let _ = DNS_TCP_NEXT.insert(way, &next, 0);
        }
    }
    unread();
}

/// One more segment with DNS messages the programs could not read.
#[inline(always)]
fn unread() {
    if let Some(n) = DNS_TCP_UNREAD.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *n += 1 };
    }
}

/// A SYN opening a connection to port 53 waits for the server's SYN-ACK in the in-flight
/// table; a RST from the server while it waits is a refusal, and the sweep counts one
/// that waits past `--dns-timeout` as never answered.
#[inline(always)]
fn connection(p: &Packet, flags: u8, ifindex: u32, egress: bool, far: AddrInfo) {
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        if p.dport != DNS_PORT {
            return;
        }
        let meta = Meta {
            ifindex,
            resolver: server_slot(p, egress, far),
            egress: u8::from(egress),
            what: FLIGHT_CONNECT as u8,
        };
        let key = flight_key(&p.src, &p.dst, p.sport, 0, FLIGHT_CONNECT);
        ended(record(&key, meta, false));
        return;
    }
    // A SYN-ACK or a RST from the server ends the connection's wait; a RST counts it
    // refused. (A RST later in a connection finds nothing waiting.)
    if p.sport != DNS_PORT {
        return;
    }
    let key = flight_key(&p.dst, &p.src, p.dport, 0, FLIGHT_CONNECT);
    if let Some((_, resolver)) = answer(&key)
        && flags & TCP_RST != 0
    {
        count(ifindex, resolver, DnsCountKind::ConnectFailure, 0, DNS_TCP);
    }
}

/// The resolver slot of a query's or a connection's server: the far end of one leaving,
/// this node of one arriving.
#[inline(always)]
fn server_slot(p: &Packet, egress: bool, far: AddrInfo) -> u8 {
    if egress {
        far.resolver
    } else {
        addr_info(&p.dst).map_or(RESOLVER_OTHER, |i| i.resolver)
    }
}

/// A DNS message with header `h`, over `transport`.
#[inline(always)]
fn message(p: &Packet, h: Header, ifindex: u32, egress: bool, far: AddrInfo, transport: u8) {
    let opcode = (h.flags >> DNS_OPCODE_SHIFT) & DNS_OPCODE_MASK;
    // Standard queries with a question only: anything else is not what we match.
    if opcode != 0 || h.qdcount == 0 {
        return;
    }
    if h.flags & DNS_QR != 0 {
        if p.sport == DNS_PORT {
            response(
                p,
                h.id,
                (h.flags & DNS_RCODE_MASK) as u8,
                ifindex,
                transport,
            );
        }
    } else if p.dport == DNS_PORT {
        let meta = Meta {
            ifindex,
            resolver: server_slot(p, egress, far),
            egress: u8::from(egress),
            what: transport,
        };
        query(p, h.id, meta);
    }
}

/// Counts one of a device's DNS messages under resolver slot `resolver`.
#[inline(always)]
fn count(ifindex: u32, resolver: u8, kind: DnsCountKind, rcode: u8, transport: u8) {
    increment(
        &DNS_COUNTS,
        &DnsCountKey {
            ifindex,
            resolver,
            kind: kind as u8,
            rcode,
            transport,
        },
        MapFull::DnsCounts,
    );
}

/// Notes a server without a slot, for the agent to consider naming.
#[inline(always)]
fn seen(server: &Addr) {
    match DNS_SEEN.get_ptr_mut(server) {
        // SAFETY: a value of the shared map; racing adds from other CPUs may lose a few,
        // and the count is only a ranking.
        Some(n) => unsafe { *n += 1 },
        None => {
            // A full LRU map takes the least recently used entry's place: never fails
            // for want of room.
            let _ = DNS_SEEN.insert(server, &1, 0);
        }
    }
}

/// The in-flight key of a query or connection from `client` port `port` to `server`.
#[inline(always)]
fn flight_key(client: &Addr, server: &Addr, port: u16, id: u16, what: u32) -> KeyWords {
    [
        client[0],
        client[1],
        client[2],
        client[3],
        server[0],
        server[1],
        server[2],
        server[3],
        u32::from(port) | (u32::from(id) << 16),
        what,
    ]
}

/// Records a query or a connection in flight. A copy already waiting is replaced
/// (`replace`: a UDP query sent again is a new try) or left in its place (a TCP segment
/// or a SYN sent again).
#[inline(always)]
fn record(key: &KeyWords, meta: Meta, replace: bool) -> Ended {
    // One object per kind of kernel: the other path is not in it.
    if crate::ATOMICS {
        pending::query(key, meta, replace)
    } else {
        inflight_query(key, meta, replace)
    }
}

/// Counts what recording a query or a connection ended. A connection ended to make room
/// is not a DNS query: the full table is counted, nothing else.
#[inline(always)]
fn ended(e: Ended) {
    let m = e.meta;
    if u32::from(m.what) == FLIGHT_CONNECT {
        return;
    }
    let kind = match e.kind {
        ENDED_SUPERSEDED => DnsCountKind::Superseded,
        ENDED_EVICTED => DnsCountKind::Untracked,
        _ => return,
    };
    count(m.ifindex, m.resolver, kind, 0, m.what);
}

/// Ends what waits under `key`: its start time and resolver slot, if this is the packet
/// that ends it.
#[inline(always)]
fn answer(key: &KeyWords) -> Option<(u64, u8)> {
    if crate::ATOMICS {
        pending::answer(key)
    } else {
        inflight_answer(key)
    }
}

/// A query from `p.src` to the server `p.dst`: counted, and recorded in flight. A
/// function of its own in the program, as the flow store is, and so is `response`: a UDP
/// message and each of a TCP segment's call them, and the verifier walks what follows
/// each call once for all the ways through them, where inlined it walked it once for
/// each (on 6.1 past its million instructions).
#[inline(never)]
fn query(p: &Packet, id: u16, meta: Meta) {
    let key = flight_key(&p.src, &p.dst, p.sport, id, u32::from(meta.what));
    let e = record(&key, meta, meta.what == DNS_UDP);
    if e.kind == ENDED_WAITING {
        return;
    }
    count(
        meta.ifindex,
        meta.resolver,
        DnsCountKind::Query,
        0,
        meta.what,
    );
    if meta.resolver == RESOLVER_OTHER {
        seen(&p.dst);
    }
    ended(e);
}

/// A response from the server `p.src`: counted, with its latency, under the slot its
/// query was counted under, if it ends a query in flight.
#[inline(never)]
fn response(p: &Packet, id: u16, rcode: u8, ifindex: u32, transport: u8) {
    let key = flight_key(&p.dst, &p.src, p.dport, id, u32::from(transport));
    let Some((start, resolver)) = answer(&key) else {
        return;
    };
    count(ifindex, resolver, DnsCountKind::Response, rcode, transport);
    observe(
        DnsSlotKey {
            ifindex,
            resolver,
            transport,
            pad: 0,
        },
        now_ns().saturating_sub(start),
    );
}

/// A `DnsFlightKey` as its words: client, server, client port and id, padding.
pub(crate) type KeyWords = [u32; DNS_FLIGHT_KEY_WORDS];

/// Records a query or a connection in `DNS_INFLIGHT` (kernels without atomics), and what
/// it ended: a copy of itself still waiting (`replace`), or (the table full, or its
/// client at its share of it) itself.
#[inline(always)]
fn inflight_query(words: &KeyWords, meta: Meta, replace: bool) -> Ended {
    // The words the pending table compares, taken as the hash map's key rather than
    // built again field by field.
    // SAFETY: `DnsFlightKey` is `repr(C)`, 10 words without padding between fields: the
    // key the map hashes is the words the probes build and compare.
    let key: DnsFlightKey = unsafe { core::mem::transmute(*words) };
    let client = clients::of(words);
    // A client at its share only replaces or keeps a copy already waiting.
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    if clients::at_share(clients::held(client), DNS_INFLIGHT_MAX_ENTRIES)
        && unsafe { DNS_INFLIGHT.get(&key) }.is_none()
    {
        map_full(MapFull::DnsInflight);
        return Ended::evicted(meta);
    }
    let flight = DnsFlight {
        start_ns: now_ns(),
        ifindex: meta.ifindex,
        resolver: meta.resolver,
        egress: meta.egress,
        pad: 0,
    };
    let mut ended = Ended::none();
    let mut r = DNS_INFLIGHT.insert(&key, &flight, BPF_NOEXIST);
    if r == Err(EEXIST) && !replace {
        return Ended::waiting();
    }
    if r == Err(EEXIST) {
        // SAFETY: a read of a map value the kernel keeps alive for the program's run.
        let copy = unsafe { DNS_INFLIGHT.get(&key) }.copied();
        // Only the deleter ends the copy, as a response or the sweep would.
        if let Some(copy) = copy
            && DNS_INFLIGHT.remove(&key).is_ok()
        {
            ended = Ended::superseded(Meta {
                ifindex: copy.ifindex,
                resolver: copy.resolver,
                egress: copy.egress,
                what: meta.what,
            });
        }
        r = DNS_INFLIGHT.insert(&key, &flight, BPF_NOEXIST);
    }
    // EEXIST again: a copy on another CPU got in between, and waits in our place. Any
    // other failure is a full table: the new query ends here, untracked (a hash table
    // has no heaviest client to make room from).
    if let Err(e) = r
        && e != EEXIST
    {
        map_full(MapFull::DnsInflight);
        ended = Ended::evicted(meta);
    }
    ended
}

/// Ends the query a response answers in `DNS_INFLIGHT`; its start time and resolver slot
/// if this response is the one that ends it.
#[inline(always)]
fn inflight_answer(words: &KeyWords) -> Option<(u64, u8)> {
    // SAFETY: `DnsFlightKey` is `repr(C)`, 10 words without padding between fields.
    let key: DnsFlightKey = unsafe { core::mem::transmute(*words) };
    // SAFETY: a read of a map value the kernel keeps alive for the program's run.
    let flight = unsafe { DNS_INFLIGHT.get(&key) }.copied()?;
    // Only the deleter counts: a duplicate response or the agent's timeout sweep
    // racing with this one loses.
    DNS_INFLIGHT.remove(&key).ok()?;
    Some((flight.start_ns, flight.resolver))
}

static ZERO_LATENCY: DnsLatency = DnsLatency {
    buckets: [0; DNS_LATENCY_BUCKETS],
    sum_ns: 0,
};

#[inline(always)]
fn observe(key: DnsSlotKey, latency_ns: u64) {
    let mut bucket = DNS_LATENCY_BUCKETS - 1;
    for (i, bound) in DNS_LATENCY_BOUNDS_NS.iter().enumerate() {
        if latency_ns <= *bound {
            bucket = i;
            break;
        }
    }
    let mut h = DNS_LATENCY.get_ptr_mut(&key);
    if h.is_none() {
        // From a zeroed global rather than the stack: the value is larger than the
        // classifier's stack can spare.
        if DNS_LATENCY
            .insert(&key, &ZERO_LATENCY, BPF_NOEXIST)
            .is_err()
        {
            map_full(MapFull::DnsLatency);
        }
        h = DNS_LATENCY.get_ptr_mut(&key);
    }
    let Some(h) = h else { return };
    // SAFETY: this CPU's own value of a per-CPU map.
    unsafe {
        if let Some(b) = (*h).buckets.get_mut(bucket) {
            *b += 1;
        }
        (*h).sum_ns += latency_ns;
    }
}
