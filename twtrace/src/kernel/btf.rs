//! Just enough of the BTF format to find where a struct member sits.
//!
//! Rust eBPF programs get no CO-RE relocations (aya #349), so the few kernel struct offsets the
//! programs need (`inet_timewait_sock.tw_timer`, ...) are read here from
//! /sys/kernel/btf/vmlinux and handed to them at load time. The format is documented in the
//! kernel's Documentation/bpf/btf.rst: a header, a type section of variable-length records, and
//! a string section.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BtfError {
    Truncated,
    BadMagic,
    /// The struct is not in the type information.
    NoStruct(String),
    /// The struct has no such member (also searched in its anonymous structs and unions).
    NoMember(String, String),
}

impl std::fmt::Display for BtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => write!(f, "BTF data is truncated"),
            Self::BadMagic => write!(f, "not BTF data (bad magic)"),
            Self::NoStruct(s) => write!(f, "struct {s} not found in BTF"),
            Self::NoMember(s, m) => write!(f, "struct {s} has no member {m} in BTF"),
        }
    }
}

impl std::error::Error for BtfError {}

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// Typedefs, qualifiers: resolve through `type_id` to reach an anonymous composite.
    Ref(u32),
    Other,
}

/// Parsed type information: composites by name, and the records needed to walk into anonymous
/// members.
pub struct Btf {
    strings: Vec<u8>,
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BtfError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(BtfError::Truncated)
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated)
}

impl Btf {
    pub fn from_sys_fs() -> std::io::Result<Result<Self, BtfError>> {
        std::fs::read("/sys/kernel/btf/vmlinux").map(|data| Self::parse(&data))
    }

    /// Parses little-endian BTF (the only kind a little-endian kernel produces).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated)?;
            let end = start.checked_add(len).ok_or(BtfError::Truncated)?;
            data.get(start..end).ok_or(BtfError::Truncated)
        };
        let type_sec = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        // Type ids start at 1; id 0 is `void`.
        let mut types = vec![Type::Other];
        let mut structs_by_name = HashMap::new();
        let mut pos = 0usize;
        while pos < type_sec.len() {
            let name_off = u32_at(type_sec, pos)?;
            let info = u32_at(type_sec, pos + 4)?;
            let size_or_type = u32_at(type_sec, pos + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let at = pos + i * 12;
                        let raw_offset = u32_at(type_sec, at + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_sec, at)?,
                            type_id: u32_at(type_sec, at + 4)?,
                            // With kind_flag, the top 8 bits hold a bitfield's size.
                            bit_offset: if kind_flag {
                                raw_offset & 0x00ff_ffff
                            } else {
                                raw_offset
                            },
                        });
                    }
                    pos += vlen * 12;
                    if kind == KIND_STRUCT && name_off != 0 {
                        let name = str_at(&strings, name_off).to_owned();
                        // Keep the first definition: vmlinux has each named struct once.
                        structs_by_name.entry(name).or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    pos += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    pos += 12;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    pos += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    pos += vlen * 12;
                    Type::Other
                }
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: no
                // trailing data. Only qualifiers and typedefs matter for the member walk.
                8..=11 => Type::Ref(size_or_type),
                _ => Type::Other,
            };
            types.push(ty);
        }
        if pos != type_sec.len() {
            return Err(BtfError::Truncated);
        }
        Ok(Self {
            strings,
            types,
            structs_by_name,
        })
    }

    /// Byte offset of `member` in `struct name`, searching anonymous structs and unions too.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.find(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            let name = str_at(&self.strings, m.name_off);
            if name == member {
                return Some(m.bit_offset);
            }
            if name.is_empty()
                && let Some(inner) = self.find(m.type_id, member, depth + 1)
            {
                return Some(m.bit_offset + inner);
            }
        }
        None
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            match self.types.get(id as usize)? {
                Type::Ref(next) => id = *next,
                other => return Some(other),
            }
        }
        None
    }

    /// Whether a named struct exists (used to tell a kernel without IPv6 apart).
    pub fn has_struct(&self, name: &str) -> bool {
        self.structs_by_name.contains_key(name)
    }
}

fn str_at(strings: &[u8], off: u32) -> &str {
    let rest = strings.get(off as usize..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF bytes: `struct outer { int a; union { int x; struct inner in; }; int bf:3 }`
    /// with `struct inner { long p; int q; }`.
    pub(crate) fn sample() -> Vec<u8> {
        let mut strings = b"\0int\0outer\0a\0x\0inner\0in\0p\0q\0bf\0".to_vec();
        let s = |name: &str, strings: &[u8]| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let int = s("int", &strings);
        // 1: int (INT, size 4, encoding word)
        push(&[int, KIND_INT << 24, 4, 32]);
        // 2: struct inner { long p @0; int q @64 }
        push(&[s("inner", &strings), KIND_STRUCT << 24 | 2, 16]);
        push(&[s("p", &strings), 1, 0]);
        push(&[s("q", &strings), 1, 64]);
        // 3: anonymous union { int x; struct inner in; }
        push(&[0, KIND_UNION << 24 | 2, 16]);
        push(&[s("x", &strings), 1, 0]);
        push(&[s("in", &strings), 2, 0]);
        // 4: const union (qualifier, resolved through)
        push(&[0, 10 << 24, 3]);
        // 5: struct outer { int a @0; <anon> @64; int bf:3 @256 } (kind_flag bitfield)
        push(&[s("outer", &strings), 1 << 31 | KIND_STRUCT << 24 | 3, 40]);
        push(&[s("a", &strings), 1, 0]);
        push(&[0, 4, 64]);
        push(&[s("bf", &strings), 1, 3 << 24 | 256]);
        strings.push(0);
        let mut out = Vec::new();
        let hdr_len = 24u32;
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        out.extend_from_slice(&hdr_len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // type_off
        out.extend_from_slice(&(types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(types.len() as u32).to_le_bytes()); // str_off
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_nested_and_bitfield_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a"), Ok(0));
        assert_eq!(btf.member_offset("outer", "x"), Ok(8));
        assert_eq!(btf.member_offset("outer", "in"), Ok(8));
        assert_eq!(btf.member_offset("outer", "bf"), Ok(32));
        assert_eq!(btf.member_offset("inner", "q"), Ok(8));
        // Members of a *named* nested struct are not members of the outer one.
        assert_eq!(
            btf.member_offset("outer", "q"),
            Err(BtfError::NoMember("outer".into(), "q".into()))
        );
        assert_eq!(
            btf.member_offset("nope", "a"),
            Err(BtfError::NoStruct("nope".into()))
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(Btf::parse(&[]).err(), Some(BtfError::Truncated));
        assert_eq!(Btf::parse(&[0; 32]).err(), Some(BtfError::BadMagic));
        let good = sample();
        for cut in 0..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        // The offsets the programs need; skipped on a machine without BTF.
        let Ok(Ok(btf)) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux here: skipped");
            return;
        };
        assert_eq!(btf.member_offset("sock_common", "skc_num"), Ok(14));
        assert!(btf.member_offset("inet_timewait_sock", "tw_timer").unwrap() > 0);
        assert_eq!(btf.member_offset("timer_list", "function"), Ok(24));
    }
}
