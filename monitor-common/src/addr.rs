//! Addresses as the programs key them.

use core::net::{IpAddr, Ipv6Addr};

/// An address as 16 bytes in network order, IPv6 as is, IPv4 mapped (`::ffff:a.b.c.d`),
/// held as four words so the classifiers copy and compare it a word at a time.
pub type Addr = [u32; 4];

/// `::ffff:0:0/96`: the third word of an IPv4-mapped address as it lies in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The address of `octets` (network order).
pub const fn addr_from_octets(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets (network order) of `a`.
pub const fn addr_octets(a: &Addr) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// `ip` as the programs key it: IPv6 as is, IPv4 mapped.
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    addr_from_octets(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    })
}

/// The address the programs recorded, IPv4 unmapped.
pub fn addr_to_ip(addr: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr_octets(&addr));
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_ipv4_mapped() {
        for s in ["10.0.0.2", "169.254.169.253", "fd00:ec2::253", "::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr_to_ip(addr_from_ip(ip)), ip);
        }
        let v4 = addr_from_ip("10.0.0.2".parse().unwrap());
        assert_eq!(v4[..3], [0, 0, V4_MAPPED_WORD]);
        assert_eq!(v4[3], u32::from_ne_bytes([10, 0, 0, 2]));
    }
}
