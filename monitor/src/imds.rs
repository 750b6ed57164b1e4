//! The EC2 instance metadata service (IMDSv2): ENI ids by MAC address, and the VPC's
//! resolver address (VPC+2). Short time-outs, retried in the background: a missing or
//! slow IMDS never delays start or fails the agent; labels stay empty until known.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use log::{debug, info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    devices::{Device, Devices},
    model::instance::{self, TcpEstablished},
};

const TOKEN_TTL_SECONDS: u32 = 21_600;
/// Responses larger than this are not metadata.
const MAX_RESPONSE: usize = 64 * 1024;

/// What IMDS says of one ENI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniInfo {
    pub id: String,
    /// The Amazon-provided resolver of the ENI's VPC: the primary CIDR's base plus two.
    pub vpc_resolver: Option<Ipv4Addr>,
}

#[derive(Clone, Debug)]
pub struct Imds {
    /// `host:port` to connect to.
    authority: String,
    timeout: Duration,
}

impl Imds {
    /// `endpoint` is `http://host[:port]`, as `--imds-endpoint` takes it.
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self> {
        let rest = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("{endpoint}: only http:// is supported"))?;
        let host = rest.split('/').next().unwrap_or_default();
        ensure!(!host.is_empty(), "{endpoint}: no host");
        let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        });
        let authority = if has_port {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        Ok(Self { authority, timeout })
    }

    async fn request(&self, method: &str, path: &str, header: (&str, &str)) -> Result<String> {
        let exchange = async {
            let mut stream = TcpStream::connect(&self.authority)
                .await
                .context("connecting")?;
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.authority, header.0, header.1
            );
            stream.write_all(req.as_bytes()).await.context("sending")?;
            let mut buf = Vec::new();
            stream
                .take(u64::try_from(MAX_RESPONSE).unwrap_or(u64::MAX))
                .read_to_end(&mut buf)
                .await
                .context("reading")?;
            parse_response(&buf)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))?
            .with_context(|| format!("{method} http://{}{path}", self.authority))
    }

    async fn token(&self) -> Result<String> {
        let ttl = TOKEN_TTL_SECONDS.to_string();
        let token = self
            .request(
                "PUT",
                "/latest/api/token",
                ("X-aws-ec2-metadata-token-ttl-seconds", &ttl),
            )
            .await?;
        Ok(token.trim().to_owned())
    }

    /// The ENI with MAC address `mac` (lower case, colon separated).
    pub async fn eni(&self, mac: &str) -> Result<EniInfo> {
        let token = self.token().await?;
        let get = |leaf: &'static str| {
            let path = format!("/latest/meta-data/network/interfaces/macs/{mac}/{leaf}");
            let token = token.clone();
            async move {
                self.request("GET", &path, ("X-aws-ec2-metadata-token", &token))
                    .await
            }
        };
        let id = get("interface-id").await?.trim().to_owned();
        ensure!(
            id.starts_with("eni-")
                && id.len() < 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "unexpected interface-id {id:?}"
        );
        // Some ENIs (EFA-only, say) have no VPC CIDR: the id alone is still worth having.
        let vpc_resolver = match get("vpc-ipv4-cidr-block").await {
            Ok(cidr) => Some(vpc_plus_two(cidr.trim())?),
            Err(_) => None,
        };
        Ok(EniInfo { id, vpc_resolver })
    }
}

impl Imds {
    /// The instance's type (`c8i.large`).
    pub async fn instance_type(&self) -> Result<String> {
        let token = self.token().await?;
        let t = self
            .request(
                "GET",
                "/latest/meta-data/instance-type",
                ("X-aws-ec2-metadata-token", &token),
            )
            .await?
            .trim()
            .to_owned();
        ensure!(
            instance::family(&t).is_some(),
            "unexpected instance-type {t:?}"
        );
        Ok(t)
    }
}

/// Learns the instance type, with back-off (1 s doubling to 60 s) until IMDS names it,
/// and with it EC2's default TCP-established timeout there.
pub async fn learn_instance_type(imds: Imds, tcp_established: TcpEstablished) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match imds.instance_type().await {
            Ok(t) => {
                let timeout = tcp_established.learn(&t);
                let why = if tcp_established.flagged() {
                    "--tcp-established-timeout"
                } else if instance::nitro_v6(&t) {
                    "EC2's default on this Nitro v6 type"
                } else {
                    "EC2's default on this type"
                };
                info!(
                    "instance type {t}: TCP established connections are tracked for {}s ({why})",
                    timeout.as_secs()
                );
                return;
            }
            Err(e) => {
                debug!("IMDS: instance type: {e:#}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_mins(1));
            }
        }
    }
}

/// The body of a 200 response; anything else is an error naming the status.
fn parse_response(raw: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete response"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("no status line"))?;
    if status != 200 {
        bail!("status {status}");
    }
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    Ok(match length {
        Some(n) => body
            .get(..n)
            .ok_or_else(|| anyhow!("body shorter than its Content-Length"))?
            .to_owned(),
        None => body.to_owned(),
    })
}

/// The base of an IPv4 CIDR plus two: where the Amazon-provided resolver answers.
pub fn vpc_plus_two(cidr: &str) -> Result<Ipv4Addr> {
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("{cidr:?} is not a CIDR"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("{cidr:?} is not a CIDR"))?;
    let len: u32 = len
        .parse()
        .with_context(|| format!("{cidr:?} is not a CIDR"))?;
    ensure!(
        (16..=28).contains(&len),
        "{cidr:?}: a VPC CIDR is /16 to /28"
    );
    let base = u32::from(addr) & (u32::MAX << (32 - len));
    Ok(Ipv4Addr::from(base + 2))
}

/// The metadata service on EC2.
pub const EC2_ENDPOINT: &str = "http://169.254.169.254";

/// Whether the firmware says this is an EC2 instance: "Amazon EC2" as the DMI system or
/// board vendor (Nitro), or an Amazon BIOS (Xen instances). `root` is the DMI directory.
pub fn on_ec2(root: &std::path::Path) -> bool {
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
    read("sys_vendor").trim() == "Amazon EC2"
        || read("board_vendor").trim() == "Amazon EC2"
        || read("bios_version").to_ascii_lowercase().contains("amazon")
}

/// The endpoint to call: the one given, else EC2's where DMI says this is EC2, else
/// none (no packet toward an address that is nobody's, no retry loop).
pub fn endpoint(given: Option<&str>, dmi: &std::path::Path) -> Option<String> {
    match given {
        Some(url) => Some(url.to_owned()),
        None if on_ec2(dmi) => Some(EC2_ENDPOINT.to_owned()),
        None => None,
    }
}

/// Labels monitored devices with their ENI ids, for as long as the agent runs: devices
/// without one are looked up with back-off (1 s doubling to 60 s). Each VPC resolver
/// found is handed to `on_resolver`.
pub async fn label_enis(imds: Imds, devices: Devices, mut on_resolver: impl FnMut(Ipv4Addr)) {
    let mut backoff = Duration::from_secs(1);
    let mut warned = false;
    loop {
        let pending: Vec<Device> = devices
            .snapshot()
            .into_values()
            .filter(|d| d.eni.is_empty())
            .collect();
        let mut failed = false;
        for d in pending {
            let found = match crate::devices::mac_address(&d.name) {
                Ok(mac) => imds.eni(&mac).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(info) => {
                    info!(
                        "{} is {}{}",
                        d.name,
                        info.id,
                        info.vpc_resolver
                            .map(|r| format!(", VPC resolver {r}"))
                            .unwrap_or_default()
                    );
                    // The resolver first: once the ENI id shows, its resolver is named.
                    if let Some(r) = info.vpc_resolver {
                        on_resolver(r);
                    }
                    devices.set_eni(d.ifindex, &info.id);
                }
                Err(e) => {
                    failed = true;
                    if warned {
                        debug!("IMDS: {}: {e:#}", d.name);
                    } else {
                        warn!(
                            "IMDS: {}: {e:#}; eni labels stay empty, retrying in the background",
                            d.name
                        );
                        warned = true;
                    }
                }
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_mins(1));
        } else {
            backoff = Duration::from_secs(1);
            // Devices that appear later are labelled on the next round.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_is_called_on_ec2_or_when_asked() {
        let dir = std::env::temp_dir().join(format!("em-dmi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |f: &str, v: &str| std::fs::write(dir.join(f), v).unwrap();
        write("sys_vendor", "QEMU\n");
        write("board_vendor", "\n");
        write("bios_version", "1.16.3-debian\n");
        assert_eq!(endpoint(None, &dir), None);
        assert_eq!(
            endpoint(Some("http://127.0.0.1:8080"), &dir).as_deref(),
            Some("http://127.0.0.1:8080")
        );
        write("sys_vendor", "Amazon EC2\n");
        assert_eq!(endpoint(None, &dir).as_deref(), Some(EC2_ENDPOINT));
        write("sys_vendor", "Xen\n");
        write("bios_version", "4.11.amazon\n");
        assert_eq!(endpoint(None, &dir).as_deref(), Some(EC2_ENDPOINT));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(endpoint(None, &dir), None, "no DMI at all is not EC2");
    }

    #[test]
    fn vpc_resolver_is_base_plus_two() {
        assert_eq!(
            vpc_plus_two("10.0.0.0/16").unwrap(),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        assert_eq!(
            vpc_plus_two("172.31.0.0/16").unwrap(),
            Ipv4Addr::new(172, 31, 0, 2)
        );
        assert_eq!(
            vpc_plus_two("10.1.2.3/24").unwrap(),
            Ipv4Addr::new(10, 1, 2, 2)
        );
        for bad in ["10.0.0.0", "10.0.0.0/8", "10.0.0.0/x", "x/16", ""] {
            assert!(vpc_plus_two(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Imds::new("http://169.254.169.254", t).unwrap().authority,
            "169.254.169.254:80"
        );
        assert_eq!(
            Imds::new("http://127.0.0.1:8080", t).unwrap().authority,
            "127.0.0.1:8080"
        );
        assert_eq!(
            Imds::new("http://[fd00:ec2::254]", t).unwrap().authority,
            "[fd00:ec2::254]:80"
        );
        assert_eq!(
            Imds::new("http://[fd00:ec2::254]:81/", t)
                .unwrap()
                .authority,
            "[fd00:ec2::254]:81"
        );
        assert!(Imds::new("https://x", t).is_err());
        assert!(Imds::new("http://", t).is_err());
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\neni-1trailing").unwrap(),
            "eni-1"
        );
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n\r\nabc").unwrap(),
            "abc"
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 401 Unauthorized\r\n\r\n")
                .unwrap_err()
                .to_string(),
            "status 401"
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nabc").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(&[0xff, 0xfe]).is_err());
    }
}
