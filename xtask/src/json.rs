//! A small JSON value (xtask depends on std only): parse what twtrace, bpftool, the loadgen and
//! cargo print; write the benchmark's results.
//! `Json::parse` reads their output; `obj`, `num` and `opt` build results that `pretty` writes.

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn parse(s: &str) -> Result<Json, String> {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i, 0)?;
        skip_ws(b, &mut i);
        if i != b.len() {
            return Err(format!("trailing characters at {i}"));
        }
        Ok(v)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// A number at this path of keys (0 when absent: bpftool omits zero counters).
    pub(crate) fn f(&self, path: &[&str]) -> f64 {
        let mut v = self;
        for k in path {
            match v.get(k) {
                Some(x) => v = x,
                None => return 0.0,
            }
        }
        v.num().unwrap_or(0.0)
    }

    pub(crate) fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat(' ').take(n));
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                if !n.is_finite() {
                    out.push_str("null");
                } else if n.fract() == 0.0 && n.abs() < 9e15 {
                    out.push_str(&format!("{}", *n as i64));
                } else {
                    out.push_str(&format!("{}", (n * 1e4).round() / 1e4));
                }
            }
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(a) => {
                // Arrays of plain values on one line, of objects one per line.
                let flat = a.iter().all(|v| !matches!(v, Json::Obj(_) | Json::Arr(_)));
                out.push('[');
                for (n, v) in a.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    if !flat {
                        out.push('\n');
                        pad(out, indent + 2);
                    }
                    v.write(out, indent + 2);
                }
                if !flat && !a.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                out.push('{');
                for (n, (k, v)) in m.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    pad(out, indent + 2);
                    out.push_str(&quote(k));
                    out.push_str(": ");
                    v.write(out, indent + 2);
                }
                if !m.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push('}');
            }
        }
    }

    pub(crate) fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s.push('\n');
        s
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize, depth: usize) -> Result<Json, String> {
    if depth > 64 {
        return Err("nested too deeply".into());
    }
    skip_ws(b, i);
    let bad = |i: usize| format!("unexpected input at {i}");
    match b.get(*i) {
        None => Err("unexpected end".into()),
        Some(b'{') => {
            *i += 1;
            let mut m = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                return Ok(Json::Obj(m));
            }
            loop {
                skip_ws(b, i);
                let Json::Str(k) = parse_value(b, i, depth + 1)? else {
                    return Err(bad(*i));
                };
                skip_ws(b, i);
                if b.get(*i) != Some(&b':') {
                    return Err(bad(*i));
                }
                *i += 1;
                let v = parse_value(b, i, depth + 1)?;
                m.push((k, v));
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return Ok(Json::Obj(m));
                    }
                    _ => return Err(bad(*i)),
                }
            }
        }
        Some(b'[') => {
            *i += 1;
            let mut a = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
                return Ok(Json::Arr(a));
            }
            loop {
                a.push(parse_value(b, i, depth + 1)?);
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {
                        *i += 1;
                        return Ok(Json::Arr(a));
                    }
                    _ => return Err(bad(*i)),
                }
            }
        }
        Some(b'"') => {
            *i += 1;
            let mut s = Vec::new();
            loop {
                match b.get(*i) {
                    None => return Err("unterminated string".into()),
                    Some(b'"') => {
                        *i += 1;
                        return String::from_utf8(s)
                            .map(Json::Str)
                            .map_err(|e| e.to_string());
                    }
                    Some(b'\\') => {
                        let c = *b.get(*i + 1).ok_or("unterminated string")?;
                        *i += 2;
                        match c {
                            b'n' => s.push(b'\n'),
                            b't' => s.push(b'\t'),
                            b'r' => s.push(b'\r'),
                            b'b' => s.push(8),
                            b'f' => s.push(12),
                            b'u' => {
                                let hex = b.get(*i..*i + 4).ok_or("bad \\u escape")?;
                                let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                                let n = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                                *i += 4;
                                let ch = char::from_u32(n).unwrap_or('\u{fffd}');
                                let mut buf = [0u8; 4];
                                s.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            }
                            other => s.push(other),
                        }
                    }
                    Some(&c) => {
                        s.push(c);
                        *i += 1;
                    }
                }
            }
        }
        Some(b't') if b[*i..].starts_with(b"true") => {
            *i += 4;
            Ok(Json::Bool(true))
        }
        Some(b'f') if b[*i..].starts_with(b"false") => {
            *i += 5;
            Ok(Json::Bool(false))
        }
        Some(b'n') if b[*i..].starts_with(b"null") => {
            *i += 4;
            Ok(Json::Null)
        }
        Some(c) if *c == b'-' || c.is_ascii_digit() => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).map_err(|e| e.to_string())?;
            t.parse::<f64>()
                .map(Json::Num)
                .map_err(|_| format!("bad number '{t}'"))
        }
        Some(_) => Err(bad(*i)),
    }
}

pub(crate) fn obj(fields: Vec<(&str, Json)>) -> Json {
    Json::Obj(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

pub(crate) fn num(n: f64) -> Json {
    Json::Num(n)
}

pub(crate) fn opt(n: Option<f64>) -> Json {
    n.map_or(Json::Null, Json::Num)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let t = r#"{"a": [1, 2.5, -3e2], "b": {"c": "x\"y\u00e9", "d": null, "e": true}}"#;
        let v = Json::parse(t).unwrap();
        assert_eq!(v.f(&["b", "zz"]), 0.0);
        assert_eq!(v.get("a").unwrap().arr().len(), 3);
        assert_eq!(v.get("b").unwrap().get("c").unwrap().str(), Some("x\"yé"));
        assert_eq!(Json::parse(&v.pretty()).unwrap(), v);
    }
}
