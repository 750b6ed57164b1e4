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
mod model;
mod pending;
mod probe_tests;
mod programs;
mod slots;
mod state;
mod status;
mod watch;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use monitor_common::{FLOW_CLASSES, LL_DNS, LL_IMDS, LL_NTP, LL_SERVICES, LL_WINDOW};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    collectors::{
        agent::{AgentCollector, Attachments},
        conntrack::ConntrackCollector,
        dns::{
            DnsCollector, LinkLocalResolvers, RecentClients, ResolverLabels, Sweeper, Unanswered,
            monotonic_ns,
        },
        drops::DropsCollector,
        ena::EnaCollector,
        flows::{Expiry, FlowCounts, FlowsCollector, Timeouts},
        linklocal::LinkLocalCollector,
        udp::UdpQueueCollector,
    },
    devices::Devices,
    imds::Imds,
    kernel::KernelFacts,
    pending::PendingTable,
    slots::SlotArray,
    watch::{SlotArrays, Watcher},
};

/// Where the firmware describes the machine.
const DMI: &str = "/sys/class/dmi/id";

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
    if let Some(cli::Command::Status { endpoint, interval }) = &cli.command {
        match status::run(endpoint, *interval) {
            Ok(screen) => print!("{screen}"),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(cli::Command::Cleanup) = cli.command {
        match state::cleanup(&cli.state_dir) {
            Ok(Some(dir)) => info!("removed {}", dir.display()),
            Ok(None) => info!("nothing to remove at {}", cli.state_dir.display()),
            Err(e) => {
                error!("{e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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

/// Every map, link and scrape holds a descriptor: the soft limit (often 1024) goes up to
/// the hard one, so that a burst of scrapes never starves the agent.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    // Bind first: a port in use or a bad address fails before anything is attached.
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;

    let (facts, mut ebpf) = load(&cli)?;

    let all = devices::interfaces()?;
    for glob in &cli.devices {
        if !all.iter().any(|(name, _)| glob.matches(name)) {
            warn!("--device {glob}: no such interface in this network namespace");
        }
    }

    let (linklocal, ll_map) = linklocal_services(&mut ebpf, &cli.linklocal_resolvers)?;

    let attachments = Attachments::default();
    programs::attach_tracepoints(&mut ebpf, &facts, &attachments);
    let classifiers_loaded = programs::load_classifiers(&mut ebpf)
        .map_err(|e| error!("{e:#}"))
        .is_ok();

    let devices = Devices::default();
    let slots = SlotArrays {
        linklocal_packets: SlotArray::new(
            programs::take_map(&mut ebpf, "LL_PACKETS")?.try_into()?,
            LL_SERVICES,
        ),
        linklocal_seconds: SlotArray::new(
            programs::take_map(&mut ebpf, "LL_SECONDS")?.try_into()?,
            LL_WINDOW,
        ),
        flows_created: SlotArray::new(
            programs::take_map(&mut ebpf, "FLOWS_CREATED")?.try_into()?,
            FLOW_CLASSES,
        ),
    };
    let unanswered = Unanswered::new(programs::take_map(&mut ebpf, "DNS_UNANSWERED")?.try_into()?);
    let flow_counts = FlowCounts::default();
    let recent = RecentClients::default();
    let shared = Shared {
        recent: recent.clone(),
        top: usize::from(cli.top),
        devices: devices.clone(),
        attachments: attachments.clone(),
        unanswered: unanswered.clone(),
        flow_counts: flow_counts.clone(),
        linklocal: linklocal.clone(),
    };
    let registry = registry(&mut ebpf, &facts, &shared, &slots, cli.conntrack_allowance)?;

    let (sweeper, expiry) = housekeeping(&mut ebpf, &cli, &shared)?;

    let mut watcher = Watcher {
        ebpf,
        globs: cli.devices.clone(),
        devices: devices.clone(),
        attachments: attachments.clone(),
        slots,
        links: HashMap::new(),
        classifiers_loaded,
    };
    // Devices a previous agent monitored keep their slots, and so their counts.
    watcher.adopt_pinned()?;
    watcher.reconcile()?;
    if devices.snapshot().is_empty() {
        warn!("no devices to monitor yet; drops are counted as device=\"other\"");
    }
    let mut tasks = vec![tokio::spawn(watch::run(watcher))];
    start_housekeeping(sweeper, expiry)?;

    tasks.extend(label_enis(&cli, devices, linklocal, ll_map)?);

    let state = Arc::new(http::State {
        registry,
        started: AtomicBool::default(),
        attachments,
    });
    tasks.push(tokio::spawn(http::serve(listener, Arc::clone(&state))));
    state.started.store(true, Ordering::Release);
    info!("serving /metrics on {}", cli.listen);

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: detaching and exiting"),
        _ = int.recv() => info!("SIGINT: detaching and exiting"),
    }
    // The watcher owns the object: ending its task drops every link, which detaches
    // the programs.
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    Ok(())
}

/// Labels the devices with their ENI ids from IMDS, where IMDS is to be called.
fn label_enis(
    cli: &Cli,
    devices: Devices,
    linklocal: LinkLocalResolvers,
    mut ll_map: programs::LinkLocalMap,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(url) = imds::endpoint(cli.imds_endpoint.as_deref(), Path::new(DMI)) else {
        info!(
            "not an EC2 instance (DMI): IMDS is not called and ENI ids stay empty; --imds-endpoint calls it anyway"
        );
        return Ok(None);
    };
    let imds = Imds::new(&url, Duration::from_secs(1))?;
    Ok(Some(tokio::spawn(imds::label_enis(
        imds,
        devices,
        move |resolver| {
            if linklocal.add(IpAddr::V4(resolver))
                && let Err(e) = programs::add_linklocal(&mut ll_map, IpAddr::V4(resolver), LL_DNS)
            {
                warn!("{e:#}");
            }
        },
    ))))
}

/// The link-local service addresses, and the resolvers the command line adds, in the
/// kernel's `LINKLOCAL` map and in the resolver labels.
fn linklocal_services(
    ebpf: &mut aya::Ebpf,
    extra: &[IpAddr],
) -> Result<(LinkLocalResolvers, programs::LinkLocalMap)> {
    let linklocal = LinkLocalResolvers::default();
    let mut map: programs::LinkLocalMap = programs::take_map(ebpf, "LINKLOCAL")?.try_into()?;
    for (addr, service) in LINKLOCAL_SERVICES {
        let ip: IpAddr = addr.parse().context("a built-in link-local address")?;
        if service == LL_DNS {
            linklocal.add(ip);
        }
        programs::add_linklocal(&mut map, ip, service)?;
    }
    for ip in extra {
        linklocal.add(*ip);
        programs::add_linklocal(&mut map, *ip, LL_DNS)?;
    }
    Ok((linklocal, map))
}

/// Reads the kernel's layout and loads the programs with it.
fn load(cli: &Cli) -> Result<(KernelFacts, aya::Ebpf)> {
    let facts = KernelFacts::read(Path::new(kernel::BTF_PATH))?;
    let pins = state::prepare(&cli.state_dir, cli.flow_table_size)?;
    // Queries in flight wait in one table or the other, by what the kernel can do; the
    // other is left at one entry.
    let unused = if facts.atomics {
        "DNS_INFLIGHT"
    } else {
        "DNS_PENDING"
    };
    let ebpf = programs::load(
        &facts,
        &[("FLOWS", cli.flow_table_size), (unused, 1)],
        pins.as_deref(),
    )?;
    Ok((facts, ebpf))
}

/// The periodic work, its maps taken from the object: timing out DNS queries and
/// expiring flows.
fn housekeeping(ebpf: &mut aya::Ebpf, cli: &Cli, shared: &Shared) -> Result<(Sweeper, Expiry)> {
    let sweeper = Sweeper {
        inflight: programs::take_hash_map(ebpf, "DNS_INFLIGHT")?,
        pending: match programs::take_map(ebpf, "DNS_PENDING")? {
            aya::maps::Map::Array(data) => {
                PendingTable::map(data).context("mapping DNS_PENDING into the agent")?
            }
            _ => anyhow::bail!("map DNS_PENDING is not an array"),
        },
        timeout: cli.dns_timeout,
        unanswered: shared.unanswered.clone(),
        recent: shared.recent.clone(),
    };
    let expiry = Expiry {
        flows: programs::take_hash_map(ebpf, "FLOWS")?,
        timeouts: Timeouts {
            tcp_established: cli.tcp_established_timeout,
            udp: cli.udp_timeout,
            udp_stream: cli.udp_stream_timeout,
        },
        counts: shared.flow_counts.clone(),
        devices: shared.devices.clone(),
        top: shared.top,
    };
    Ok((sweeper, expiry))
}

fn now_s() -> u32 {
    u32::try_from(monotonic_ns() / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Starts the periodic work, each on a thread of its own so that scrapes never wait
/// behind it (a pass over a million flows takes a few hundred milliseconds). A first
/// pass runs now, once the devices are known: the flows a previous agent left are
/// counted from the first scrape.
fn start_housekeeping(mut sweeper: Sweeper, mut expiry: Expiry) -> Result<()> {
    if let Err(e) = expiry.pass(now_s()) {
        warn!("expiring flows: {e}");
    }
    let period = sweeper.period();
    every_on_thread("dns-sweep", period, move || {
        if let Err(e) = sweeper.sweep(monotonic_ns()) {
            warn!("timing out DNS queries: {e}");
        }
    })?;
    let period = expiry.period();
    every_on_thread("flow-expiry", period, move || {
        if let Err(e) = expiry.pass(now_s()) {
            warn!("expiring flows: {e}");
        }
    })?;
    Ok(())
}

/// Runs `f` every `period` on a thread named `name`, for the agent's life.
fn every_on_thread(
    name: &str,
    period: Duration,
    mut f: impl FnMut() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                f();
            }
        })
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}

/// State the collectors share with the agent's tasks.
struct Shared {
    recent: RecentClients,
    top: usize,
    devices: Devices,
    attachments: Attachments,
    unanswered: Unanswered,
    flow_counts: FlowCounts,
    linklocal: LinkLocalResolvers,
}

/// One collector per source, each owning the maps it reads.
fn registry(
    ebpf: &mut aya::Ebpf,
    facts: &KernelFacts,
    shared: &Shared,
    slots: &SlotArrays,
    allowance: Option<u64>,
) -> Result<Registry> {
    let mut registry = Registry::with_prefix("eni_monitor");
    registry.register_collector(Box::new(AgentCollector {
        attachments: shared.attachments.clone(),
        devices: shared.devices.clone(),
        map_full: programs::take_map(ebpf, "MAP_FULL")?.try_into()?,
    }));
    registry.register_collector(Box::new(DropsCollector {
        map: programs::take_map(ebpf, "DROPS")?.try_into()?,
        devices: shared.devices.clone(),
        reasons: facts.reasons.clone(),
    }));
    registry.register_collector(Box::new(UdpQueueCollector {
        drops: programs::take_map(ebpf, "UDP_QUEUE_DROPS")?.try_into()?,
    }));
    registry.register_collector(Box::new(DnsCollector {
        counts: programs::take_map(ebpf, "DNS_COUNTS")?.try_into()?,
        latency: programs::take_map(ebpf, "DNS_LATENCY")?.try_into()?,
        unanswered: shared.unanswered.clone(),
        devices: shared.devices.clone(),
        resolvers: Mutex::new(ResolverLabels::new(
            shared.linklocal.clone(),
            Some(programs::take_map(ebpf, "DNS_RESOLVERS")?.try_into()?),
        )),
        recent: shared.recent.clone(),
        top: shared.top,
    }));
    registry.register_collector(Box::new(ConntrackCollector::new()));
    registry.register_collector(Box::new(EnaCollector {
        devices: shared.devices.clone(),
        flows: shared.flow_counts.clone(),
        allowance: Mutex::new(model::Allowance::new(allowance)),
    }));
    registry.register_collector(Box::new(FlowsCollector {
        created: slots.flows_created.clone(),
        table_full: programs::take_map(ebpf, "FLOW_TABLE_FULL")?.try_into()?,
        counts: shared.flow_counts.clone(),
        devices: shared.devices.clone(),
    }));
    registry.register_collector(Box::new(LinkLocalCollector {
        packets: slots.linklocal_packets.clone(),
        seconds: slots.linklocal_seconds.clone(),
        devices: shared.devices.clone(),
    }));
    Ok(registry)
}
