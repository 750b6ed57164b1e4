//! eni-monitor: a node agent that warns before an ENI runs out of its EC2 allowances or
//! DNS packets start to vanish.

mod batch;
mod btf;
mod cli;
mod collectors;
mod devices;
mod ethtool;
mod http;
mod imds;
mod kernel;
mod probe_tests;
mod programs;
mod tracefs;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
    sync::{Arc, Mutex, atomic::{AtomicBool, Ordering}},
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use monitor_common::{LL_DNS, LL_IMDS, LL_NTP};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    collectors::{
        agent::{AgentCollector, Attachments},
        conntrack::ConntrackCollector,
        dns::{DnsCollector, LinkLocalResolvers, ResolverLabels, Sweeper, Unanswered, monotonic_ns},
        drops::DropsCollector,
        ena::EnaCollector,
        flows::{Expiry, FlowCounts, FlowsCollector, Timeouts},
        linklocal::LinkLocalCollector,
        udp::UdpQueueCollector,
    },
    devices::Devices,
    imds::Imds,
    kernel::KernelFacts,
};

/// EC2's link-local service addresses.
const LINKLOCAL_SERVICES: [(&str, u32); 6] = [
    ("169.254.169.253", LL_DNS),
    ("fd00:ec2::253", LL_DNS),
    ("169.254.169.254", LL_IMDS),
    ("fd00:ec2::254", LL_IMDS),
    ("169.254.169.123", LL_NTP),
    ("fd00:ec2::123", LL_NTP),
];

fn main() {
    let cli = Cli::parse_or_exit();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    // Bind first: a port in use or a bad address fails before anything is attached.
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;

    let tracefs = {
        let candidates: Vec<PathBuf> = match &cli.tracefs {
            Some(p) => vec![p.clone()],
            None => tracefs::DEFAULT_ROOTS.iter().map(PathBuf::from).collect(),
        };
        tracefs::find_root(&candidates).map_err(|e| error!("{e}")).ok()
    };
    let facts = KernelFacts::read(Path::new(kernel::BTF_PATH), tracefs.as_deref())?;
    let mut ebpf = programs::load(&facts, cli.flow_table_size)?;

    let all = devices::interfaces()?;
    let selected = devices::select(&all, &cli.devices, devices::is_physical);
    for glob in &cli.devices {
        if !all.iter().any(|(name, _)| glob.matches(name)) {
            warn!("--device {glob}: no such interface in this network namespace");
        }
    }
    if selected.is_empty() {
        warn!("no devices to monitor; drops are counted as device=\"other\"");
    }
    info!("monitoring {}", selected.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "));
    programs::set_monitored(&mut ebpf, &selected)?;

    let linklocal = LinkLocalResolvers::default();
    let mut ll_map: programs::LinkLocalMap = programs::take_map(&mut ebpf, "LINKLOCAL")?.try_into()?;
    for (addr, service) in LINKLOCAL_SERVICES {
        let ip: IpAddr = addr.parse().context("a built-in link-local address")?;
        if service == LL_DNS {
            linklocal.add(ip);
        }
        programs::add_linklocal(&mut ll_map, ip, service)?;
    }
    for ip in &cli.linklocal_resolvers {
        linklocal.add(*ip);
        programs::add_linklocal(&mut ll_map, *ip, LL_DNS)?;
    }

    let attachments = Attachments::default();
    programs::attach_tracepoints(&mut ebpf, &facts, &attachments);
    match programs::load_classifiers(&mut ebpf) {
        Ok(()) => {
            for device in &selected {
                programs::attach_classifiers(&mut ebpf, device, &attachments);
            }
        }
        Err(e) => error!("{e:#}"),
    }
    let devices = Devices::default();
    devices.replace(selected);

    let unanswered = Unanswered::default();
    let mut sweeper = Sweeper {
        inflight: programs::take_map(&mut ebpf, "DNS_INFLIGHT")?.try_into()?,
        timeout: cli.dns_timeout,
        unanswered: unanswered.clone(),
    };
    let sweep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweeper.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sweeper.sweep(monotonic_ns());
        }
    });

    let flow_counts = FlowCounts::default();
    let mut expiry = Expiry {
        flows: programs::take_hash_map(&mut ebpf, "FLOWS")?,
        timeouts: Timeouts {
            tcp_established: cli.tcp_established_timeout,
            udp: cli.udp_timeout,
            udp_stream: cli.udp_stream_timeout,
        },
        counts: flow_counts.clone(),
    };
    let expire = tokio::spawn(async move {
        let mut tick = tokio::time::interval(expiry.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = u32::try_from(monotonic_ns() / 1_000_000_000).unwrap_or(u32::MAX);
            if let Err(e) = expiry.pass(now) {
                warn!("expiring flows: {e}");
            }
        }
    });

    let imds = Imds::new(&cli.imds_endpoint, Duration::from_secs(1))?;
    let labeller = {
        let linklocal = linklocal.clone();
        tokio::spawn(imds::label_enis(imds, devices.clone(), move |resolver| {
            if linklocal.add(IpAddr::V4(resolver))
                && let Err(e) = programs::add_linklocal(&mut ll_map, IpAddr::V4(resolver), LL_DNS)
            {
                warn!("{e:#}");
            }
        }))
    };

    let registry = registry(&mut ebpf, &facts, &devices, &attachments, unanswered, &linklocal, &flow_counts, cli.conntrack_allowance)?;
    let state = Arc::new(http::State { registry, started: AtomicBool::default(), attachments });
    let server = tokio::spawn(http::serve(listener, Arc::clone(&state)));
    state.started.store(true, Ordering::Release);
    info!("serving /metrics on {}", cli.listen);

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: detaching and exiting"),
        _ = int.recv() => info!("SIGINT: detaching and exiting"),
    }
    server.abort();
    sweep.abort();
    labeller.abort();
    expire.abort();
    // Dropping the object closes every link, which detaches the programs.
    drop(ebpf);
    Ok(())
}

/// One collector per source, each owning the maps it reads.
fn registry(
    ebpf: &mut aya::Ebpf,
    facts: &KernelFacts,
    devices: &Devices,
    attachments: &Attachments,
    unanswered: Unanswered,
    linklocal: &LinkLocalResolvers,
    flow_counts: &FlowCounts,
    allowance: Option<u64>,
) -> Result<Registry> {
    let mut registry = Registry::with_prefix("eni_monitor");
    registry.register_collector(Box::new(AgentCollector { attachments: attachments.clone() }));
    registry.register_collector(Box::new(DropsCollector {
        map: programs::take_map(ebpf, "DROPS")?.try_into()?,
        devices: devices.clone(),
        reasons: facts.reasons.clone(),
    }));
    registry.register_collector(Box::new(UdpQueueCollector {
        drops: programs::take_map(ebpf, "UDP_QUEUE_DROPS")?.try_into()?,
    }));
    registry.register_collector(Box::new(DnsCollector {
        counts: programs::take_map(ebpf, "DNS_COUNTS")?.try_into()?,
        latency: programs::take_map(ebpf, "DNS_LATENCY")?.try_into()?,
        unanswered,
        devices: devices.clone(),
        resolvers: Mutex::new(ResolverLabels::new(linklocal.clone())),
    }));
    registry.register_collector(Box::new(ConntrackCollector::new()));
    registry.register_collector(Box::new(EnaCollector {
        devices: devices.clone(),
        flows: flow_counts.clone(),
        allowance,
        monotonic: Mutex::default(),
    }));
    registry.register_collector(Box::new(FlowsCollector {
        created: programs::take_map(ebpf, "FLOWS_CREATED")?.try_into()?,
        table_full: programs::take_map(ebpf, "FLOW_TABLE_FULL")?.try_into()?,
        counts: flow_counts.clone(),
        devices: devices.clone(),
    }));
    registry.register_collector(Box::new(LinkLocalCollector {
        packets: programs::take_map(ebpf, "LL_PACKETS")?.try_into()?,
        seconds: programs::take_map(ebpf, "LL_SECONDS")?.try_into()?,
        devices: devices.clone(),
    }));
    Ok(registry)
}
