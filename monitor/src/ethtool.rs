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
/// Statistics a driver may add between the count and the read.
const STATS_MARGIN: usize = 64;

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
    // The kernel writes as many names and values as the driver has when it answers,
    // which may be more than GSSET_INFO said a moment before (a driver adding
    // statistics): every buffer has room to spare, and a count that changed between
    // the calls makes this read an error rather than names paired with wrong values.
    let room = count + STATS_MARGIN;
    // struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[]; }: the
    // header is 12 bytes, so the names start 4 bytes into the second u64.
    let mut strings = vec![0u64; 2 + (room * ETH_GSTRING_LEN).div_ceil(8)];
    strings[0] = u64::from(ETHTOOL_GSTRINGS) | (u64::from(ETH_SS_STATS) << 32);
    strings[1] = count as u64;
    ioctl(&sock, device, &mut strings)?;
    let named = (strings[1] & 0xffff_ffff) as usize;
    let table: Vec<u8> = strings
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .skip(12)
        .take(count * ETH_GSTRING_LEN)
        .collect();
    // struct ethtool_stats { u32 cmd; u32 n_stats; u64 data[]; }
    let mut values = vec![0u64; 1 + room];
    values[0] = u64::from(ETHTOOL_GSTATS) | ((count as u64) << 32);
    ioctl(&sock, device, &mut values)?;
    let returned = (values[0] >> 32) as usize;
    if named != count || returned != count {
        return Err(io::Error::other(format!(
            "{device}: the driver's statistics changed while being read ({count}, then {named} names and {returned} values)"
        )));
    }
    Ok(parse(&table, &values[1..=count]))
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
        if !integration_tests::require_root("the_ioctls_on_a_veth") {
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
}
