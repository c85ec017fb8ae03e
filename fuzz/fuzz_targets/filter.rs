//! `--peer` CIDRs (`twtrace::track::filter::Cidr`) and the command line's other value parsers, on
//! arbitrary strings. Never panics; what they accept is in range.
//!
//! Input: the string up to the first NUL byte (lossy UTF-8), then after it up to 17 bytes for
//! an address to test `contains` with: a byte choosing IPv4 or IPv6, then the address (zeros
//! when short). The seeds are plain text.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use twtrace::cli::{
    parse_comm, parse_duration, parse_listen, parse_pid, parse_port, parse_positive,
    parse_ring_size,
};
use twtrace::track::filter::Cidr;

/// The address and prefix of a parsed CIDR, from its display form (the fields are private).
fn parts(c: &Cidr) -> (IpAddr, u8) {
    let s = c.to_string();
    let (a, p) = s.rsplit_once('/').expect("a CIDR displays as ADDR/LEN");
    (
        a.parse().expect("the address of a CIDR parses"),
        p.parse().expect("the prefix of a CIDR parses"),
    )
}

/// An address as (bits, width): the reference `contains` works on integers.
fn bits(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn from_bits(v: u128, width: u32) -> IpAddr {
    if width == 32 {
        Ipv4Addr::from(v as u32).into()
    } else {
        Ipv6Addr::from(v).into()
    }
}

/// Every bit of an address of this width.
fn all(width: u32) -> u128 {
    if width == 32 {
        u32::MAX as u128
    } else {
        u128::MAX
    }
}

/// The network bits of a prefix.
fn mask(prefix: u8, width: u32) -> u128 {
    all(width) & !all(width).checked_shr(prefix as u32).unwrap_or(0)
}

fn reference_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    let ((n, nw), (i, iw)) = (bits(net), bits(ip));
    nw == iw && (n & mask(prefix, nw)) == (i & mask(prefix, nw))
}

fn cidr(s: &str, probe: IpAddr) {
    let Ok(c) = s.parse::<Cidr>() else { return };
    assert_eq!(
        c.to_string().parse::<Cidr>(),
        Ok(c),
        "display of {s:?} does not round-trip"
    );
    let (net, prefix) = parts(&c);
    let (n, width) = bits(net);
    assert!(prefix as u32 <= width, "{s:?}: prefix {prefix} > {width}");
    assert_eq!(
        n & !mask(prefix, width),
        0,
        "{s:?} parsed with host bits set"
    );
    if let IpAddr::V6(v6) = net {
        assert!(
            v6.to_ipv4_mapped().is_none(),
            "{s:?}: IPv4-mapped net not shown as IPv4"
        );
    }
    assert!(
        c.contains(net),
        "{c} does not contain its own network address"
    );
    let last = from_bits(n | (all(width) & !mask(prefix, width)), width);
    assert!(c.contains(last), "{c} does not contain {last}");
    if prefix > 0 {
        // The addresses just outside.
        let size = 1u128.checked_shl(width - prefix as u32).unwrap_or(0);
        if let Some(below) = n.checked_sub(1) {
            assert!(
                !c.contains(from_bits(below, width)),
                "{c} contains {below:x}"
            );
        }
        let above = n.wrapping_add(size);
        if size != 0 && above > n && (width == 128 || above <= u32::MAX as u128) {
            assert!(
                !c.contains(from_bits(above, width)),
                "{c} contains {above:x}"
            );
        }
    }
    assert_eq!(
        c.contains(probe),
        reference_contains(net, prefix, probe),
        "{c} contains {probe}"
    );
    // Same family, other address family.
    let other: IpAddr = match probe {
        IpAddr::V4(a) => a.to_ipv6_mapped().into(),
        IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED).into(),
    };
    assert_eq!(c.contains(other), reference_contains(net, prefix, other));
}

fn others(s: &str) {
    if let Ok(p) = parse_port(s) {
        assert!(p >= 1, "{s:?} -> port {p}");
    }
    if let Ok(d) = parse_duration(s) {
        assert!(!d.is_zero(), "{s:?} -> zero duration");
    }
    if let Ok(r) = parse_ring_size(s) {
        let n = r.bytes;
        assert!(
            n.is_power_of_two() && (4096..=256 << 20).contains(&n),
            "{s:?} -> ring {n}"
        );
        assert_eq!(r.typed, s, "the value as typed, for messages");
    }
    if let Ok(c) = parse_comm(s) {
        assert!((1..=15).contains(&c.len()) && c == s, "{s:?} -> comm {c:?}");
    }
    if let Ok(p) = parse_pid(s) {
        assert!(p > 0, "{s:?} -> pid 0");
    }
    if let Ok(n) = parse_positive(s) {
        assert!((1..=1_000_000).contains(&n), "{s:?} -> count {n}");
    }
    let _ = parse_listen(s);
}

fuzz_target!(|data: &[u8]| {
    let (text, tail) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let s = String::from_utf8_lossy(text);
    let mut raw = [0u8; 17];
    let n = tail.len().min(17);
    raw[..n].copy_from_slice(&tail[..n]);
    let probe: IpAddr = if raw[0] & 1 == 0 {
        Ipv4Addr::new(raw[1], raw[2], raw[3], raw[4]).into()
    } else {
        Ipv6Addr::from(<[u8; 16]>::try_from(&raw[1..]).unwrap()).into()
    };
    cidr(&s, probe);
    others(&s);
});
