//! A small reader of the kernel's BTF (`Documentation/bpf/btf.rst`), limited to what the
//! agent needs: struct and union members (through anonymous members, typedefs and
//! modifiers), enum values, and tracepoint prototypes (`btf_trace_<name>`). Rust eBPF has no CO-RE, so offsets are read here at start
//! and handed to the programs as load-time globals.

mod parse;

use std::collections::HashMap;

use anyhow::{Context as _, Result, anyhow, bail, ensure};

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
/// C's separate name spaces that lookups go by: `struct x`, `enum x` and a typedef `x`
/// may all exist at once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Namespace {
    /// Structs and unions.
    Composite,
    Enum,
    Typedef,
}

/// A member of a struct or union.
#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset from the start of the enclosing type, in bits.
    bit_offset: u32,
    /// Non-zero for a bitfield.
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
enum Kind {
    /// Types the reader only needs to step over or size.
    Sized {
        size: u32,
    },
    /// `PTR`, `TYPEDEF`, `VOLATILE`, `CONST`, `RESTRICT`, `TYPE_TAG`: refer to another type.
    Ref {
        target: u32,
        is_ptr: bool,
    },
    Array {
        elem: u32,
        nelems: u32,
    },
    Composite {
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        size: u32,
        values: Vec<(u32, i64)>,
    },
    /// A function prototype: its parameters' type ids.
    FuncProto {
        params: Vec<u32>,
    },
    Other,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    /// The BTF kind number (`KIND_*`).
    btf_kind: u32,
    kind: Kind,
}

/// Where a member lies, in bytes from the start of the outermost type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parsed BTF: types by id and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(Namespace, String), u32>,
}

impl Btf {
    fn str(&self, off: u32) -> Result<&str> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| anyhow!("string offset {off} beyond the string section"))?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).with_context(|| format!("string at {off} is not UTF-8"))
    }

    fn get(&self, id: u32) -> Result<&Type> {
        self.types
            .get(id as usize)
            .ok_or_else(|| anyhow!("type id {id} out of range"))
    }

    /// Follows typedefs and modifiers (not pointers) to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<u32> {
        for _ in 0..32 {
            match self.get(id)?.kind {
                Kind::Ref {
                    target,
                    is_ptr: false,
                } => id = target,
                _ => return Ok(id),
            }
        }
        bail!("type chain from id {id} too deep")
    }

    fn size_of(&self, id: u32) -> Result<u32> {
        let id = self.resolve(id)?;
        Ok(match &self.get(id)?.kind {
            Kind::Sized { size } | Kind::Composite { size, .. } | Kind::Enum { size, .. } => *size,
            Kind::Ref { is_ptr: true, .. } => 8,
            Kind::Array { elem, nelems } => self.size_of(*elem)?.saturating_mul(*nelems),
            Kind::Ref { .. } | Kind::FuncProto { .. } | Kind::Other => {
                bail!("type id {id} has no size")
            }
        })
    }

    /// Finds `name` among the members of composite `id`, descending into anonymous
    /// struct and union members. Returns the bit offset and the member.
    fn find_member(&self, id: u32, name: &str) -> Result<Option<(u32, Member)>> {
        let Kind::Composite { members, .. } = &self.get(self.resolve(id)?)?.kind else {
            bail!("type id {id} is not a struct or union");
        };
        for m in members {
            if m.name_off == 0 {
                let inner = self.resolve(m.type_id)?;
                if matches!(self.get(inner)?.kind, Kind::Composite { .. })
                    && let Some((off, found)) = self.find_member(inner, name)?
                {
                    return Ok(Some((m.bit_offset + off, found)));
                }
            } else if self.str(m.name_off)? == name {
                return Ok(Some((m.bit_offset, m.clone())));
            }
        }
        Ok(None)
    }

    /// The byte offset and size of `path` (members joined by `.`) inside struct `name`.
    pub fn member(&self, name: &str, path: &str) -> Result<Field> {
        let mut id = *self
            .by_name
            .get(&(Namespace::Composite, name.to_owned()))
            .ok_or_else(|| anyhow!("struct {name} not found in BTF"))?;
        let mut bits = 0u32;
        let mut size = 0;
        for part in path.split('.') {
            let (off, member) = self
                .find_member(id, part)?
                .ok_or_else(|| anyhow!("struct {name} has no member {path}"))?;
            ensure!(member.bitfield_size == 0, "{name}.{path} is a bitfield");
            bits += off;
            id = member.type_id;
            size = self.size_of(id)?;
        }
        ensure!(bits.is_multiple_of(8), "{name}.{path} is not byte aligned");
        Ok(Field {
            offset: bits / 8,
            size,
        })
    }

    /// The enumerators of enum `name` as (name, value).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>> {
        let id = *self
            .by_name
            .get(&(Namespace::Enum, name.to_owned()))
            .ok_or_else(|| anyhow!("enum {name} not found in BTF"))?;
        let Kind::Enum { values, .. } = &self.get(id)?.kind else {
            bail!("{name} is not an enum");
        };
        values
            .iter()
            .map(|&(n, v)| Ok((self.str(n)?.to_owned(), v)))
            .collect()
    }
}

impl Btf {
    /// The parameter types of raw tracepoint `name`, from the typedef the kernel declares
    /// for it (`btf_trace_<name>`, a pointer to `void (void *__data, <TP_PROTO>)`), without
    /// that first `__data`: index i is the raw tracepoint's argument i.
    pub fn tracepoint_params(&self, name: &str) -> Result<Vec<String>> {
        let typedef = format!("btf_trace_{name}");
        let id = *self
            .by_name
            .get(&(Namespace::Typedef, typedef.clone()))
            .ok_or_else(|| anyhow!("tracepoint {name} not in BTF (no typedef {typedef})"))?;
        let Kind::Ref { target, .. } = self.get(id)?.kind else {
            bail!("{typedef} is not a typedef");
        };
        let Kind::Ref {
            target: proto,
            is_ptr: true,
        } = self.get(self.resolve(target)?)?.kind
        else {
            bail!("{typedef} is not a function pointer");
        };
        let Kind::FuncProto { params } = &self.get(self.resolve(proto)?)?.kind else {
            bail!("{typedef} does not point to a function prototype");
        };
        params
            .iter()
            .skip(1)
            .map(|&p| self.describe(p, 0))
            .collect()
    }

    /// A type as C spells it, modifiers left out: `struct sk_buff *`, `enum x`, `int`.
    fn describe(&self, id: u32, depth: u32) -> Result<String> {
        ensure!(depth < 32, "type chain from id {id} too deep");
        if id == 0 {
            return Ok("void".to_owned());
        }
        let ty = self.get(id)?;
        let name = self.str(ty.name_off)?;
        Ok(match (ty.btf_kind, &ty.kind) {
            (KIND_PTR, Kind::Ref { target, .. }) => {
                format!("{} *", self.describe(*target, depth + 1)?)
            }
            (KIND_TYPEDEF, _) => name.to_owned(),
            (_, Kind::Ref { target, .. }) => self.describe(*target, depth + 1)?,
            (KIND_STRUCT, _) => format!("struct {name}"),
            (KIND_UNION, _) => format!("union {name}"),
            (KIND_ENUM | KIND_ENUM64, _) => format!("enum {name}"),
            _ => name.to_owned(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read as _;

    use super::*;

    /// BTF of a 6.18 `x86_64` kernel, copied from `/sys/kernel/btf/vmlinux`.
    pub(crate) fn fixture() -> Btf {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/btf/vmlinux-6.18.btf.gz"
        );
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("decompressing {path}: {e}"));
        Btf::parse(&raw).unwrap_or_else(|e| panic!("parsing {path}: {e:#}"))
    }

    #[test]
    fn offsets_match_the_compilers() {
        let btf = fixture();
        // Expected values: offsetof/sizeof compiled against a header generated from the
        // same BTF (bpftool btf dump format c).
        let cases = [
            ("sk_buff", "dev", 16, 8),
            ("sk_buff", "head", 192, 8),
            ("sk_buff", "network_header", 180, 2),
            ("sk_buff", "transport_header", 178, 2),
            ("sk_buff", "skb_iif", 144, 4),
            ("net_device", "ifindex", 224, 4),
            // possible_net_t is a typedef of an anonymous struct.
            ("net_device", "nd_net.net", 264, 8),
            ("net", "ns.inum", 176, 4),
        ];
        for (ty, path, offset, size) in cases {
            assert_eq!(
                btf.member(ty, path).unwrap(),
                Field { offset, size },
                "{ty}.{path}"
            );
        }
    }

    #[test]
    fn drop_reasons_from_the_enum() {
        let btf = fixture();
        let values = btf.enum_values("skb_drop_reason").unwrap();
        let find = |n: &str| values.iter().find(|(name, _)| name == n).map(|&(_, v)| v);
        assert_eq!(find("SKB_NOT_DROPPED_YET"), Some(0));
        assert_eq!(find("SKB_DROP_REASON_NOT_SPECIFIED"), Some(2));
        assert_eq!(find("SKB_DROP_REASON_NO_SOCKET"), Some(3));
        assert_eq!(find("SKB_DROP_REASON_NETFILTER_DROP"), Some(12));
    }

    #[test]
    fn tracepoint_prototypes() {
        let btf = fixture();
        assert_eq!(
            btf.tracepoint_params("kfree_skb").unwrap(),
            [
                "struct sk_buff *",
                "void *",
                "enum skb_drop_reason",
                "struct sock *"
            ]
        );
        assert_eq!(
            btf.tracepoint_params("udp_fail_queue_rcv_skb").unwrap(),
            ["int", "struct sock *", "struct sk_buff *"]
        );
        assert_eq!(
            btf.tracepoint_params("no_such_tracepoint")
                .unwrap_err()
                .to_string(),
            "tracepoint no_such_tracepoint not in BTF (no typedef btf_trace_no_such_tracepoint)"
        );
    }

    #[test]
    fn missing_names_are_errors() {
        let btf = fixture();
        let err = btf.member("sk_buff", "no_such_member").unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sk_buff has no member no_such_member"
        );
        assert!(btf.member("no_such_struct", "x").is_err());
        assert!(btf.enum_values("no_such_enum").is_err());
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        assert_eq!(
            Btf::parse(&[0xeb, 0x9f, 1, 0, 24, 0, 0, 0])
                .err()
                .unwrap()
                .to_string(),
            "big-endian BTF is not supported"
        );
        // A header pointing past the end of the data.
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 1000, 1000, 10] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        assert!(Btf::parse(&hdr).is_err());
        // Every truncation of a real type section fails cleanly.
        let mut tiny = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 16, 16, 1] {
            tiny.extend_from_slice(&v.to_le_bytes());
        }
        tiny.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 4, 0, 0, 0]); // INT, 4 bytes
        tiny.extend_from_slice(&[0, 0, 0, 32]);
        tiny.push(0);
        assert!(Btf::parse(&tiny).is_ok());
        for cut in 24..tiny.len() - 1 {
            assert!(Btf::parse(&tiny[..cut]).is_err(), "cut at {cut}");
        }
    }
}
