//! Query parameters of `GET /api/v1/report`: the report's options and filters, parsed by the
//! same strict parsers as the command line. Pure; fuzzed.

use crate::{
    cli::{parse_cidr, parse_comm, parse_pid, parse_port, parse_positive},
    present::report::Sort,
    track::aggregate::By,
    track::filter::Filter,
};

/// Longest query string accepted (longer ones are refused, not truncated).
pub const MAX_QUERY: usize = 2048;
/// At most this many values per filter.
const MAX_VALUES: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportQuery {
    pub by: By,
    pub sort: Sort,
    pub top: usize,
    pub filter: Filter,
}

impl Default for ReportQuery {
    fn default() -> Self {
        Self {
            by: By::Service,
            sort: Sort::TimeWait,
            top: 20,
            filter: Filter::default(),
        }
    }
}

/// `%41` and `+` decoding; None for a broken escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn push<T>(v: &mut Vec<T>, x: T, name: &str) -> Result<(), String> {
    if v.len() >= MAX_VALUES {
        return Err(format!("at most {MAX_VALUES} values of '{name}'"));
    }
    v.push(x);
    Ok(())
}

/// A network namespace's inode number (the API takes no names: it answers from what twtrace
/// has seen, without looking anything up).
fn parse_netns_inode(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a network namespace inode number (as `lsns -t net` shows)"
        )),
    }
}

/// Parses `by=peer&top=10&port=443&peer=10.0.0.0/8&...` over `defaults` (serve's `--by` and
/// `--sort`). Unknown or repeated-when-single parameters are refused, each error naming the
/// parameter and the value.
pub fn parse(query: Option<&str>, defaults: ReportQuery) -> Result<ReportQuery, String> {
    let mut q = defaults;
    let Some(query) = query.filter(|s| !s.is_empty()) else {
        return Ok(q);
    };
    if query.len() > MAX_QUERY {
        return Err(format!("query longer than {MAX_QUERY} bytes"));
    }
    let mut seen_single: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k).ok_or_else(|| format!("bad escape in parameter name '{k}'"))?;
        let val = decode(v).ok_or_else(|| format!("bad escape in the value of '{key}'"))?;
        let named = |e: String| format!("{key}: {e}");
        match key.as_str() {
            "by" | "sort" | "top" | "family" => {
                let k: &str = match key.as_str() {
                    "by" => "by",
                    "sort" => "sort",
                    "top" => "top",
                    _ => "family",
                };
                if seen_single.contains(&k) {
                    return Err(format!("'{k}' given twice"));
                }
                seen_single.push(k);
                match k {
                    "by" => q.by = val.parse().map_err(named)?,
                    "sort" => q.sort = val.parse().map_err(named)?,
                    "top" => q.top = parse_positive(&val).map_err(named)?,
                    _ => {
                        q.filter.family = match val.as_str() {
                            "4" => Some(4),
                            "6" => Some(6),
                            _ => return Err(format!("family: '{val}' is not 4 or 6")),
                        }
                    }
                }
            }
            "port" => push(
                &mut q.filter.ports,
                parse_port(&val).map_err(named)?,
                "port",
            )?,
            "peer" => push(
                &mut q.filter.peers,
                parse_cidr(&val).map_err(named)?,
                "peer",
            )?,
            "pid" => push(&mut q.filter.pids, parse_pid(&val).map_err(named)?, "pid")?,
            "comm" => push(
                &mut q.filter.comms,
                parse_comm(&val).map_err(named)?,
                "comm",
            )?,
            "netns" => push(
                &mut q.filter.netns,
                parse_netns_inode(&val).map_err(named)?,
                "netns",
            )?,
            other => {
                return Err(format!(
                    "unknown parameter '{other}' (by, sort, top, port, peer, pid, comm, family, netns)"
                ));
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_everything_the_cli_does() {
        let q = parse(
            Some(
                "by=peer&top=5&sort=rate&port=443&port=80&peer=10.0.0.0%2F8&pid=7&comm=my+app&family=4",
            ),
            ReportQuery::default(),
        )
        .unwrap();
        assert_eq!(q.by, By::Peer);
        assert_eq!(q.top, 5);
        assert_eq!(q.sort, Sort::Rate);
        assert_eq!(q.filter.ports, vec![443, 80]);
        assert_eq!(q.filter.peers[0].to_string(), "10.0.0.0/8");
        assert_eq!(q.filter.pids, vec![7]);
        assert_eq!(q.filter.comms, vec!["my app".to_owned()]);
        assert_eq!(q.filter.family, Some(4));
        assert_eq!(
            parse(None, ReportQuery::default()),
            Ok(ReportQuery::default())
        );
        assert_eq!(
            parse(Some(""), ReportQuery::default()),
            Ok(ReportQuery::default())
        );
        // serve --by port --sort births: the defaults of a query that does not say.
        let serve = ReportQuery {
            by: By::Port,
            sort: Sort::Entered,
            ..ReportQuery::default()
        };
        let q = parse(Some("top=3"), serve.clone()).unwrap();
        assert_eq!((q.by, q.sort, q.top), (By::Port, Sort::Entered, 3));
        assert_eq!(parse(Some("by=peer"), serve).unwrap().by, By::Peer);
    }

    #[test]
    fn refuses_with_the_value_named() {
        for (bad, needle) in [
            ("by=host", "'host'"),
            ("port=99999", "'99999'"),
            ("peer=10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("top=0", "'0'"),
            ("family=5", "'5'"),
            ("by=peer&by=port", "'by' given twice"),
            ("colour=red", "unknown parameter 'colour'"),
            ("port=%zz", "bad escape"),
            ("port=%", "bad escape"),
            ("port=%+8", "bad escape"),
            ("comm=%ff", "bad escape"),
        ] {
            let e = parse(Some(bad), ReportQuery::default()).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let long = "port=1&".repeat(400);
        assert!(
            parse(Some(&long), ReportQuery::default())
                .unwrap_err()
                .contains("longer than")
        );
        let many = "port=1&".repeat(40);
        assert!(
            parse(Some(&many), ReportQuery::default())
                .unwrap_err()
                .contains("at most 32")
        );
    }
}
