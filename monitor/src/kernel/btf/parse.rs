//! Reading raw BTF: the header, the type records one by one (each kind's record as
//! `btf.rst` lays it out), and the index of the types looked up by name.

use std::collections::HashMap;

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use super::*;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

// The sizes of BTF's records (`Documentation/bpf/btf.rst`): `struct btf_type`, then
// what follows it for each kind.
/// `struct btf_type`: name, info, size or type.
const TYPE_LEN: usize = 12;
/// The `u32` after an `INT` (its encoding), a `VAR` (its linkage) or a `DECL_TAG` (its index).
const U32_LEN: usize = 4;
/// `struct btf_array`: element type, index type, count.
const ARRAY_LEN: usize = 12;
/// `struct btf_member`: name, type, offset.
const MEMBER_LEN: usize = 12;
/// `struct btf_enum`: name, value.
const ENUM_LEN: usize = 8;
/// `struct btf_enum64`: name, low and high halves of the value.
const ENUM64_LEN: usize = 12;
/// `struct btf_param`: name, type.
const PARAM_LEN: usize = 8;
/// `struct btf_var_secinfo`: type, offset, size.
const VAR_SECINFO_LEN: usize = 12;

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| anyhow!("truncated at byte {off}"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| anyhow!("truncated at byte {off}"))
}

impl Btf {
    /// Parses raw BTF as found in `/sys/kernel/btf/vmlinux` (little endian only).
    pub fn parse(data: &[u8]) -> Result<Self> {
        let (type_sec, strings) = Self::sections(data)?;
        // Type id 0 is void.
        let mut types = vec![Type {
            name_off: 0,
            btf_kind: 0,
            kind: Kind::Other,
        }];
        let mut pos = 0;
        while pos < type_sec.len() {
            let (ty, len) = Self::parse_type(type_sec, pos)
                .with_context(|| format!("BTF type {} at byte {pos}", types.len()))?;
            types.push(ty);
            pos += len;
        }
        let mut btf = Btf {
            types,
            strings: strings.to_vec(),
            by_name: HashMap::new(),
        };
        btf.by_name = btf.names()?;
        Ok(btf)
    }

    /// The type and string sections the header points at, checked to lie in `data`.
    fn sections(data: &[u8]) -> Result<(&[u8], &[u8])> {
        let magic = u16_at(data, 0).context("reading BTF header")?;
        if magic == MAGIC.swap_bytes() {
            bail!("big-endian BTF is not supported");
        }
        ensure!(magic == MAGIC, "not BTF data (magic {magic:#06x})");
        let hdr_len = u32_at(data, 4)? as usize;
        ensure!(
            hdr_len >= HEADER_LEN,
            "BTF header too short ({hdr_len} bytes)"
        );
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize, what: &str| {
            let start = hdr_len
                .checked_add(off)
                .ok_or_else(|| anyhow!("{what} offset overflows"))?;
            let end = start
                .checked_add(len)
                .ok_or_else(|| anyhow!("{what} length overflows"))?;
            data.get(start..end).ok_or_else(|| {
                anyhow!(
                    "{what} section [{start}, {end}) beyond {} bytes",
                    data.len()
                )
            })
        };
        Ok((
            section(type_off, type_len, "type")?,
            section(str_off, str_len, "string")?,
        ))
    }

    /// The types lookups find by name, by name space.
    fn names(&self) -> Result<HashMap<(Namespace, String), u32>> {
        let mut by_name = HashMap::new();
        for (id, ty) in self.types.iter().enumerate().skip(1) {
            let space = match ty.btf_kind {
                KIND_STRUCT | KIND_UNION => Namespace::Composite,
                KIND_ENUM | KIND_ENUM64 => Namespace::Enum,
                KIND_TYPEDEF => Namespace::Typedef,
                _ => continue,
            };
            if ty.name_off != 0 {
                let name = self.str(ty.name_off)?.to_owned();
                // Keep the first definition; later ones with the same name are rare
                // duplicates from different compilation units.
                by_name.entry((space, name)).or_insert(u32::try_from(id)?);
            }
        }
        Ok(by_name)
    }

    /// One type record and where the next begins. Over 60 lines: one arm per BTF kind,
    /// each as short as its record.
    fn parse_type(sec: &[u8], pos: usize) -> Result<(Type, usize)> {
        let name_off = u32_at(sec, pos)?;
        let info = u32_at(sec, pos + 4)?;
        let size_or_type = u32_at(sec, pos + 8)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let body = pos + TYPE_LEN;
        let ty = |k| Type {
            name_off,
            btf_kind: kind,
            kind: k,
        };
        Ok(match kind {
            KIND_INT => (ty(Kind::Sized { size: size_or_type }), TYPE_LEN + U32_LEN),
            KIND_PTR | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
            | KIND_TYPE_TAG => (
                ty(Kind::Ref {
                    target: size_or_type,
                    is_ptr: kind == KIND_PTR,
                }),
                TYPE_LEN,
            ),
            KIND_ARRAY => {
                let elem = u32_at(sec, body)?;
                let nelems = u32_at(sec, body + 8)?;
                (ty(Kind::Array { elem, nelems }), TYPE_LEN + ARRAY_LEN)
            }
            KIND_STRUCT | KIND_UNION => (
                ty(Kind::Composite {
                    size: size_or_type,
                    members: Self::parse_members(sec, body, vlen, kind_flag)?,
                }),
                TYPE_LEN + vlen * MEMBER_LEN,
            ),
            KIND_ENUM => {
                let signed = kind_flag;
                let mut values = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let e = body + i * ENUM_LEN;
                    let raw = u32_at(sec, e + 4)?;
                    #[expect(
                        clippy::cast_possible_wrap,
                        reason = "BTF stores signed values as u32"
                    )]
                    let v = if signed {
                        i64::from(raw as i32)
                    } else {
                        i64::from(raw)
                    };
                    values.push((u32_at(sec, e)?, v));
                }
                (
                    ty(Kind::Enum {
                        size: size_or_type,
                        values,
                    }),
                    TYPE_LEN + vlen * ENUM_LEN,
                )
            }
            KIND_ENUM64 => {
                let mut values = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let e = body + i * ENUM64_LEN;
                    let lo = u64::from(u32_at(sec, e + 4)?);
                    let hi = u64::from(u32_at(sec, e + 8)?);
                    #[expect(
                        clippy::cast_possible_wrap,
                        reason = "reinterpreting the 64 stored bits"
                    )]
                    values.push((u32_at(sec, e)?, ((hi << 32) | lo) as i64));
                }
                (
                    ty(Kind::Enum {
                        size: size_or_type,
                        values,
                    }),
                    TYPE_LEN + vlen * ENUM64_LEN,
                )
            }
            KIND_FWD | KIND_FUNC => (ty(Kind::Other), TYPE_LEN),
            KIND_FLOAT => (ty(Kind::Sized { size: size_or_type }), TYPE_LEN),
            KIND_FUNC_PROTO => {
                let params = (0..vlen)
                    .map(|i| u32_at(sec, body + i * PARAM_LEN + 4))
                    .collect::<Result<_>>()?;
                (ty(Kind::FuncProto { params }), TYPE_LEN + vlen * PARAM_LEN)
            }
            KIND_VAR | KIND_DECL_TAG => (ty(Kind::Other), TYPE_LEN + U32_LEN),
            KIND_DATASEC => (ty(Kind::Other), TYPE_LEN + vlen * VAR_SECINFO_LEN),
            other => bail!("unknown BTF kind {other}"),
        })
    }

    fn parse_members(sec: &[u8], body: usize, vlen: usize, kind_flag: bool) -> Result<Vec<Member>> {
        (0..vlen)
            .map(|i| {
                let m = body + i * MEMBER_LEN;
                let raw = u32_at(sec, m + 8)?;
                let (bit_offset, bitfield_size) = if kind_flag {
                    (raw & 0x00ff_ffff, raw >> 24)
                } else {
                    (raw, 0)
                };
                Ok(Member {
                    name_off: u32_at(sec, m)?,
                    type_id: u32_at(sec, m + 4)?,
                    bit_offset,
                    bitfield_size,
                })
            })
            .collect()
    }
}
