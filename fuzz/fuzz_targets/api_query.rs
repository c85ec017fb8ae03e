//! `twtrace::present::api::parse`: the query string of `GET /api/v1/report`, straight from the network.
//! Never panics; what it accepts is in range.
//!
//! Input: the query string (lossy UTF-8: a URI's query reaches the parser as a `&str`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twtrace::present::api::{MAX_QUERY, ReportQuery, parse};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let Ok(q) = parse(Some(&s), ReportQuery::default()) else {
        return;
    };
    assert!(s.len() <= MAX_QUERY, "{} bytes accepted", s.len());
    assert!((1..=1_000_000).contains(&q.top), "{s:?}: top {}", q.top);
    let f = &q.filter;
    for (name, n) in [
        ("port", f.ports.len()),
        ("peer", f.peers.len()),
        ("pid", f.pids.len()),
        ("comm", f.comms.len()),
    ] {
        assert!(n <= 32, "{s:?}: {n} values of {name}");
    }
    assert!(f.ports.iter().all(|&p| p >= 1), "{s:?}: port 0");
    assert!(f.pids.iter().all(|&p| p >= 1), "{s:?}: pid 0");
    assert!(
        f.comms.iter().all(|c| (1..=15).contains(&c.len())),
        "{s:?}: comm {:?}",
        f.comms
    );
    assert!(
        matches!(f.family, None | Some(4) | Some(6)),
        "{s:?}: family {:?}",
        f.family
    );
    // The parameters that were given are the ones that were set.
    if !s.contains("top") && !s.contains('%') {
        assert_eq!(q.top, 20, "{s:?}");
    }
});
