//! A driver's statistics by name, through the ethtool ioctls (netlink does not carry
//! driver statistics): `ETHTOOL_GSSET_INFO` for the count, `ETHTOOL_GSTRINGS` for the
//! names, `ETHTOOL_GSTATS` for the values. Never by position: drivers add statistics.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use crate::devices::{control_socket, ifreq};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETH_SS_STATS: u32 = 1;
pub const ETH_GSTRING_LEN: usize = 32;
/// Room for statistics a driver may add between the count and the read (a change of
/// queues: ENA has about 30 a queue pair): twice the count, and this many more.
const STATS_MARGIN: usize = 1024;

/// Pairs a string table (`ETH_GSTRING_LEN` bytes a name) with its values.
pub fn parse(strings: &[u8], values: &[u64]) -> BTreeMap<String, u64> {
    strings
        .chunks_exact(ETH_GSTRING_LEN)
        .zip(values)
        .filter_map(|(raw, v)| {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = std::str::from_utf8(&raw[..end]).ok()?;
            (!name.is_empty()).then(|| (name.to_owned(), *v))
        })
        .collect()
}

/// Issues one ethtool command on `device`; `buf` starts with the command's struct.
fn ioctl(sock: &OwnedFd, device: &str, buf: &mut [u64]) -> io::Result<()> {
    let mut req = ifreq(device)?;
    req.ifr_ifru.ifru_data = buf.as_mut_ptr().cast();
    // SAFETY: a valid socket and an ifreq pointing at `buf`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Words the kernel writes into, ending where an inaccessible page begins. The kernel
/// writes as many names and values as the driver has when it answers, whatever the
/// buffer: one that grew past the room left fails with `EFAULT` at the guard page,
/// where it would have written over the agent's memory.
struct Guarded {
    base: *mut libc::c_void,
    len: usize,
    words: usize,
}

impl Guarded {
    fn new(words: usize) -> io::Result<Self> {
        let page = page_size();
        let bytes = (words * 8).div_ceil(page) * page;
        let len = bytes + page;
        // SAFETY: a private anonymous mapping of `len` bytes, unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let g = Self { base, len, words };
        // SAFETY: the last page of the mapping just made.
        if unsafe { libc::mprotect(base.cast::<u8>().add(bytes).cast(), page, libc::PROT_NONE) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(g)
    }

    /// The `words` words that end at the guard page.
    fn words(&mut self) -> &mut [u64] {
        // SAFETY: the words lie inside the writable part of the mapping, ending at the
        // guard page (the writable part is a whole number of pages, each 8-aligned).
        unsafe {
            let writable = self.len - page_size();
            let start = self.base.cast::<u8>().add(writable - self.words * 8);
            #[expect(
                clippy::cast_ptr_alignment,
                reason = "a page-aligned mapping less a whole number of words: 8-aligned"
            )]
            let words = start.cast::<u64>();
            std::slice::from_raw_parts_mut(words, self.words)
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The statistics of `device`; empty when the driver has none.
pub fn stats(device: &str) -> io::Result<BTreeMap<String, u64>> {
    let sock = control_socket()?;
    // struct ethtool_sset_info { u32 cmd; u32 reserved; u64 sset_mask; u32 data[1]; }
    let mut info = [0u64; 3];
    info[0] = u64::from(ETHTOOL_GSSET_INFO);
    info[1] = 1 << ETH_SS_STATS;
    match ioctl(&sock, device, &mut info) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(BTreeMap::new()),
        r => r?,
    }
    if info[1] & (1 << ETH_SS_STATS) == 0 {
        return Ok(BTreeMap::new());
    }
    let count = (info[2] & 0xffff_ffff) as usize;
    if count == 0 || count > 1 << 16 {
        return Ok(BTreeMap::new());
    }
    read(&sock, device, count, 2 * count + STATS_MARGIN)
}

/// The names and values of `device`'s `count` statistics, in buffers with room for
/// `room`. A count that changed since it was read, or outgrew the room, makes this read
/// an error rather than names paired with wrong values (or memory written over).
fn read(
    sock: &OwnedFd,
    device: &str,
    count: usize,
    room: usize,
) -> io::Result<BTreeMap<String, u64>> {
    let changed = |named: usize, returned: usize| {
        io::Error::other(format!(
            "{device}: the driver's statistics changed while being read ({count}, then {named} names and {returned} values)"
        ))
    };
    let faulted = |e: io::Error| {
        if e.raw_os_error() == Some(libc::EFAULT) {
            io::Error::other(format!(
                "{device}: the driver's statistics outgrew room for {room} while being read ({count} a moment before)"
            ))
        } else {
            e
        }
    };
    // struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[]; }: the
    // header is 12 bytes, so the names start 4 bytes into the second u64.
    let mut strings = Guarded::new(2 + (room * ETH_GSTRING_LEN).div_ceil(8))?;
    let words = strings.words();
    words[0] = u64::from(ETHTOOL_GSTRINGS) | (u64::from(ETH_SS_STATS) << 32);
    words[1] = count as u64;
    ioctl(sock, device, words).map_err(faulted)?;
    let named = (words[1] & 0xffff_ffff) as usize;
    if named != count {
        return Err(changed(named, 0));
    }
    let table: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .skip(12)
        .take(count * ETH_GSTRING_LEN)
        .collect();
    // struct ethtool_stats { u32 cmd; u32 n_stats; u64 data[]; }
    let mut values = Guarded::new(1 + room)?;
    let words = values.words();
    words[0] = u64::from(ETHTOOL_GSTATS) | ((count as u64) << 32);
    ioctl(sock, device, words).map_err(faulted)?;
    let returned = (words[0] >> 32) as usize;
    if returned != count {
        return Err(changed(named, returned));
    }
    Ok(parse(&table, &words[1..=count]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixture of `tests/fixtures/ena`: ioctl payloads captured in their exact layout.
    pub(crate) fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/ena/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    pub(crate) fn u64s(bytes: &[u8]) -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn ena_statistics_by_name() {
        let s = parse(&fixture("gstrings.bin"), &u64s(&fixture("gstats-1.bin")));
        assert_eq!(s["conntrack_allowance_available"], 87_211);
        assert_eq!(s["conntrack_allowance_exceeded"], 12);
        assert_eq!(s["linklocal_allowance_exceeded"], 3);
        assert_eq!(s["pps_allowance_exceeded"], 0);
        assert_eq!(s["bw_in_allowance_exceeded"], 41);
        assert_eq!(s["bw_out_allowance_exceeded"], 7);
        assert_eq!(s["queue_0_tx_cnt"], 1_000_000);
    }

    #[test]
    fn short_or_odd_tables_do_not_panic() {
        let strings = fixture("gstrings.bin");
        let values = u64s(&fixture("gstats-1.bin"));
        assert_eq!(parse(&strings, &values[..3]).len(), 3);
        assert_eq!(parse(&strings[..40], &values).len(), 1);
        assert!(parse(&[0xff; 32], &[1]).is_empty());
        assert!(parse(&[], &[]).is_empty());
    }

    #[test]
    fn the_ioctls_on_a_veth() {
        if !crate::root::require_root("the_ioctls_on_a_veth") {
            return;
        }
        let name = format!("emv{}", std::process::id() % 100_000);
        let ok = std::process::Command::new("ip")
            .args([
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{name}p"),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let s = stats(&name);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
        let s = s.unwrap();
        assert!(s.contains_key("peer_ifindex"), "{s:?}");
        assert!(s.contains_key("rx_queue_0_drops"), "{s:?}");
        assert!(stats("no-such-dev0").is_err());
        assert!(stats("lo").unwrap().is_empty());
    }

    #[test]
    fn statistics_that_outgrow_the_buffer_are_an_error_not_memory_written_over() {
        if !crate::root::require_root("statistics_that_outgrow_the_buffer") {
            return;
        }
        // A veth with 64 queues: its statistics are counted by queue, a few hundred.
        let name = format!("emq{}", std::process::id() % 100_000);
        let ok = std::process::Command::new("ip")
            .args([
                "link",
                "add",
                &name,
                "numtxqueues",
                "64",
                "numrxqueues",
                "64",
            ])
            .args(["type", "veth", "peer", "name", &format!("{name}p")])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let all = stats(&name);
        let sock = control_socket().unwrap();
        // As if the count had been read before the queues were added: far less room
        // than the driver has statistics. A kernel since 6.10 writes none and says 0
        // names; an older one writes them all, and the guard page stops it.
        let short = read(&sock, &name, 4, 4);
        // The right count with no room to spare reads whole.
        let n = all.as_ref().map_or(0, BTreeMap::len);
        let exact = read(&sock, &name, n, n);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
        let all = all.unwrap();
        assert!(all.len() > 200, "{}", all.len());
        let e = short.unwrap_err().to_string();
        assert!(
            e.contains("changed while being read (4, then 0 names")
                || e.contains("outgrew room for 4"),
            "{e}"
        );
        assert_eq!(exact.unwrap(), all);
    }

    #[test]
    fn the_kernel_writing_past_a_guarded_buffer_faults() {
        // uname(2) writes a 390-byte struct with one copy: into 8 words before the guard
        // page it cannot, and says so rather than write on.
        let mut g = Guarded::new(8).unwrap();
        let words = g.words();
        words.fill(7);
        // SAFETY: a pointer into the mapping; the kernel checks every byte it writes.
        let r = unsafe { libc::uname(words.as_mut_ptr().cast()) };
        assert_eq!(r, -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EFAULT)
        );
        let mut g = Guarded::new(64).unwrap();
        // SAFETY: a pointer into the mapping, with room for the whole `utsname`.
        assert_eq!(unsafe { libc::uname(g.words().as_mut_ptr().cast()) }, 0);
    }
}
