//! The command line (a contract: tests and tooling use it). Every flag also reads an
//! environment variable; a bad value is one line naming the flag.

use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "monitor",
    version,
    about = "Warns before an ENI runs out of its EC2 allowances or DNS packets vanish"
)]
pub struct Cli {
    /// ENIs to watch, as globs over interface names (default: physical NICs).
    #[arg(long = "device", value_name = "GLOB", env = "MONITOR_DEVICE", value_delimiter = ',', value_parser = parse_glob)]
    pub devices: Vec<glob::Pattern>,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MONITOR_LISTEN",
        default_value = "0.0.0.0:9435"
    )]
    pub listen: SocketAddr,

    /// EC2 instance metadata service, for ENI ids (`IMDSv2`). Default: `http://169.254.169.254`
    /// on EC2 (as DMI says); elsewhere IMDS is not called unless this is given.
    #[arg(long, value_name = "URL", env = "MONITOR_IMDS_ENDPOINT", value_parser = parse_http_url)]
    pub imds_endpoint: Option<String>,

    /// A DNS query is unanswered after this long.
    #[arg(long, value_name = "DURATION", env = "MONITOR_DNS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dns_timeout: Duration,

    /// EC2 tracking timeout of an established TCP connection. Default: EC2's for the
    /// instance type IMDS names (350s on Nitro v6 types, else 432000s), 432000s until known.
    #[arg(long, value_name = "DURATION", env = "MONITOR_TCP_ESTABLISHED_TIMEOUT", value_parser = parse_duration)]
    pub tcp_established_timeout: Option<Duration>,

    /// EC2 tracking timeout of a UDP flow seen in one direction only.
    #[arg(long, value_name = "DURATION", env = "MONITOR_UDP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub udp_timeout: Duration,

    /// EC2 tracking timeout of a UDP flow with traffic both ways.
    #[arg(long, value_name = "DURATION", env = "MONITOR_UDP_STREAM_TIMEOUT", default_value = "180s", value_parser = parse_duration)]
    pub udp_stream_timeout: Duration,

    /// A named resolver (not Amazon's) quiet this long gives its name up: its series go,
    /// and what it counted is reported under resolver="other".
    #[arg(long, value_name = "DURATION", env = "MONITOR_RESOLVER_IDLE", default_value = "5m", value_parser = parse_duration)]
    pub resolver_idle: Duration,

    /// Instance connection-tracking allowance, where the ENA driver does not report one.
    #[arg(long, value_name = "N", env = "MONITOR_CONNTRACK_ALLOWANCE", value_parser = clap::value_parser!(u64).range(1..))]
    pub conntrack_allowance: Option<u64>,

    /// Extra addresses counted as the link-local DNS resolver (the VPC+2 address).
    #[arg(
        long = "linklocal-resolver",
        value_name = "IP",
        env = "MONITOR_LINKLOCAL_RESOLVER",
        value_delimiter = ','
    )]
    pub linklocal_resolvers: Vec<IpAddr>,

    /// Flows the flow table holds, over all monitored ENIs (one table keyed by device).
    #[arg(long, value_name = "N", env = "MONITOR_FLOW_TABLE_SIZE", default_value = "262144", value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_table_size: u32,

    /// How many of the busiest local addresses (tracked flows, unanswered DNS) each ENI
    /// reports: the bound on the `top_*` series.
    #[arg(long, value_name = "N", env = "MONITOR_TOP", default_value = "10", value_parser = clap::value_parser!(u16).range(1..=100))]
    pub top: u16,

    /// TLS and basic auth for the endpoints, in `node_exporter`'s web configuration format
    /// (`tls_server_config`, `basic_auth_users` with bcrypt hashes).
    #[arg(long, value_name = "FILE", env = "MONITOR_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,

    /// Where the maps that survive a restart are pinned, on a BPF filesystem.
    #[arg(long, value_name = "DIR", env = "MONITOR_STATE_DIR", default_value = crate::loader::pins::DEFAULT_DIR, global = true)]
    pub state_dir: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove the pinned maps (after uninstalling: frees their kernel memory).
    Cleanup,
    /// One screen from a running agent: the allowance, then per ENI what needs attention.
    Status {
        /// The agent to ask.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9435", value_parser = parse_http_url)]
        endpoint: String,
        /// Rates are over this long: the agent is read twice, this far apart.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
        interval: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 2s, 500ms, 5m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

fn parse_glob(s: &str) -> Result<glob::Pattern, String> {
    if s.is_empty() {
        return Err("empty device pattern".to_owned());
    }
    glob::Pattern::new(s).map_err(|e| e.to_string())
}

fn parse_http_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .ok_or("only http:// endpoints are supported")?;
    if rest.trim_end_matches('/').is_empty() {
        return Err("no host".to_owned());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

impl Cli {
    /// Parses the process arguments. Help and version print and exit 0; an error prints
    /// its first line (which names the flag) and exits 2.
    pub fn parse_or_exit() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|err| {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                err.exit();
            }
            let text = err.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid command line")
            );
            std::process::exit(2);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("monitor").chain(args.iter().copied()))
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_owned())
    }

    #[test]
    fn cleanup_is_a_subcommand_that_takes_the_state_dir() {
        let cli = parse(&["cleanup", "--state-dir", "/run/x"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Cleanup)));
        assert_eq!(cli.state_dir, PathBuf::from("/run/x"));
        assert!(parse(&[]).unwrap().command.is_none());
    }

    #[test]
    fn defaults_match_the_design() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.state_dir, PathBuf::from("/sys/fs/bpf/eni-monitor"));
        assert_eq!(cli.listen, "0.0.0.0:9435".parse().unwrap());
        assert_eq!(cli.imds_endpoint, None);
        assert_eq!(cli.dns_timeout, Duration::from_secs(2));
        assert_eq!(cli.tcp_established_timeout, None);
        assert_eq!(cli.udp_timeout, Duration::from_secs(30));
        assert_eq!(cli.udp_stream_timeout, Duration::from_mins(3));
        assert!(cli.devices.is_empty());
        assert_eq!(cli.conntrack_allowance, None);
    }

    #[test]
    fn repeated_and_comma_separated_values() {
        let cli = parse(&[
            "--device",
            "eth*",
            "--device",
            "ens5,ens6",
            "--linklocal-resolver",
            "10.0.0.2",
        ])
        .unwrap();
        let globs: Vec<_> = cli.devices.iter().map(glob::Pattern::as_str).collect();
        assert_eq!(globs, ["eth*", "ens5", "ens6"]);
        assert_eq!(
            cli.linklocal_resolvers,
            ["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_values_name_the_flag_in_one_line() {
        for (args, flag) in [
            (&["--listen", "nowhere"][..], "--listen"),
            (&["--dns-timeout", "soon"], "--dns-timeout"),
            (&["--dns-timeout", "0s"], "--dns-timeout"),
            (&["--udp-timeout=-1s"], "--udp-timeout"),
            (&["--conntrack-allowance", "0"], "--conntrack-allowance"),
            (&["--conntrack-allowance", "many"], "--conntrack-allowance"),
            (&["--flow-table-size", "0"], "--flow-table-size"),
            (
                &["--linklocal-resolver", "10.0.0.300"],
                "--linklocal-resolver",
            ),
            (&["--imds-endpoint", "ftp://x"], "--imds-endpoint"),
            (&["--device", "eth[0"], "--device"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.starts_with("error: invalid value"), "{args:?}: {err}");
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(
            parse(&["--no-such-flag"])
                .unwrap_err()
                .contains("--no-such-flag")
        );
    }
}
