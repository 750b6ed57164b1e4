//! Tracepoint format files: field offsets, and drop-reason names from `__print_symbolic`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};

/// Where tracefs is usually mounted, in the order tried.
pub const DEFAULT_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The first of `candidates` that holds tracepoint events.
pub fn find_root(candidates: &[PathBuf]) -> Result<PathBuf> {
    candidates
        .iter()
        .find(|root| root.join("events").is_dir())
        .cloned()
        .ok_or_else(|| {
            let tried: Vec<_> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow!(
                "tracefs not found (tried {}); mount it with `mount -t tracefs nodev /sys/kernel/tracing`",
                tried.join(", ")
            )
        })
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub type_name: String,
    pub offset: u32,
    pub size: u32,
}

/// A parsed `events/<category>/<name>/format` file.
#[derive(Clone, Debug)]
pub struct Format {
    pub fields: Vec<FormatField>,
    pub print_fmt: String,
}

impl Format {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut fields = Vec::new();
        let mut print_fmt = String::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("print fmt:") {
                rest.trim().clone_into(&mut print_fmt);
            } else if line.starts_with("field:") {
                fields.push(parse_field(line).with_context(|| format!("field line {line:?}"))?);
            }
        }
        if fields.is_empty() {
            return Err(anyhow!("no fields"));
        }
        Ok(Format { fields, print_fmt })
    }

    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Like [`Format::field`], but a missing field or one of another size is an error.
    pub fn require(&self, name: &str, size: u32) -> Result<&FormatField> {
        let f = self.field(name).ok_or_else(|| anyhow!("no field {name}"))?;
        if f.size != size {
            return Err(anyhow!("field {name} is {} bytes, expected {size}", f.size));
        }
        Ok(f)
    }

    /// The `{ value, "NAME" }` pairs of the first `__print_symbolic` over `REC->field`.
    pub fn symbols(&self, field: &str) -> Vec<(i64, String)> {
        let needle = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&needle) else {
            return Vec::new();
        };
        let mut rest = &self.print_fmt[start + needle.len()..];
        let mut out = Vec::new();
        while let Some(open) = rest.find('{') {
            // The list ends with the closing parenthesis of __print_symbolic.
            if rest[..open].contains(')') {
                break;
            }
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let entry = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            let Some((value, name)) = entry.split_once(',') else {
                continue;
            };
            let name = name.trim().trim_matches('"');
            if let Ok(v) = value.trim().parse::<i64>() {
                out.push((v, name.to_owned()));
            }
        }
        out
    }
}

fn parse_field(line: &str) -> Result<FormatField> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d.trim());
        } else if let Some(v) = part.strip_prefix("offset:") {
            offset = Some(v.parse::<u32>().context("offset")?);
        } else if let Some(v) = part.strip_prefix("size:") {
            size = Some(v.parse::<u32>().context("size")?);
        }
    }
    let decl = decl.ok_or_else(|| anyhow!("no declaration"))?;
    // "unsigned char saddr[28]": the name is the last word, without any array suffix.
    let (type_name, name) = decl
        .rsplit_once([' ', '*'])
        .ok_or_else(|| anyhow!("no type"))?;
    let name = name.split('[').next().unwrap_or(name);
    Ok(FormatField {
        name: name.to_owned(),
        type_name: type_name.trim().to_owned(),
        offset: offset.ok_or_else(|| anyhow!("no offset"))?,
        size: size.ok_or_else(|| anyhow!("no size"))?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A format file of `tests/fixtures/tracefs`, copied from a real kernel.
    pub(crate) fn fixture(name: &str) -> Format {
        let path = format!(
            "{}/tests/fixtures/tracefs/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Format::parse(&text).unwrap_or_else(|e| panic!("{path}: {e:#}"))
    }

    #[test]
    fn kfree_skb_on_6_18() {
        let f = fixture("kfree_skb-6.18.format");
        let off = |n: &str| f.field(n).map(|x| (x.offset, x.size));
        assert_eq!(off("skbaddr"), Some((8, 8)));
        assert_eq!(off("rx_sk"), Some((24, 8)));
        assert_eq!(off("protocol"), Some((32, 2)));
        assert_eq!(off("reason"), Some((36, 4)));
        assert_eq!(f.field("reason").unwrap().type_name, "enum skb_drop_reason");
        let symbols = f.symbols("reason");
        assert_eq!(symbols.len(), 127);
        assert_eq!(symbols[0], (2, "NOT_SPECIFIED".to_owned()));
        assert_eq!(symbols[1], (3, "NO_SOCKET".to_owned()));
        assert!(symbols.contains(&(12, "NETFILTER_DROP".to_owned())));
        assert_eq!(symbols.last(), Some(&(128, "MAX".to_owned())));
    }

    #[test]
    fn kfree_skb_before_drop_reasons() {
        let f = fixture("kfree_skb-5.10.format");
        assert_eq!(f.field("protocol").map(|x| x.offset), Some(24));
        assert!(f.field("reason").is_none());
        assert!(f.symbols("reason").is_empty());
        assert_eq!(
            f.require("reason", 4).unwrap_err().to_string(),
            "no field reason"
        );
    }

    #[test]
    fn udp_fail_queue_rcv_skb_on_6_18() {
        let f = fixture("udp_fail_queue_rcv_skb-6.18.format");
        assert_eq!(f.require("rc", 4).unwrap().offset, 8);
        assert_eq!(f.require("sport", 2).unwrap().offset, 12);
        assert_eq!(f.require("dport", 2).unwrap().offset, 14);
        let saddr = f.field("saddr").unwrap();
        assert_eq!(
            (saddr.offset, saddr.size, saddr.type_name.as_str()),
            (18, 28, "__u8")
        );
        assert_eq!(
            f.require("dport", 4).unwrap_err().to_string(),
            "field dport is 2 bytes, expected 4"
        );
    }

    #[test]
    fn malformed_formats_are_errors() {
        assert!(Format::parse("").is_err());
        assert!(Format::parse("name: x\nformat:\n").is_err());
        assert!(Format::parse("\tfield:int x;\toffset:abc;\tsize:4;").is_err());
        assert!(Format::parse("\tfield:int x;\tsize:4;").is_err());
        assert!(Format::parse("\tfield:x;\toffset:1;\tsize:4;").is_err());
    }

    #[test]
    fn missing_tracefs_names_what_to_do() {
        let err = find_root(&[PathBuf::from("/nonexistent/tracing")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "tracefs not found (tried /nonexistent/tracing); mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
        );
    }
}
