//! The agent: the object loaded, its state continued, the devices watched, the periodic
//! work started, the collectors registered and served, until SIGTERM.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use monitor_common::LinkLocalService;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    collectors::{
        agent::AgentCollector,
        conntrack::ConntrackCollector,
        dns::DnsCollector,
        drops::DropsCollector,
        ena::{AtMostEvery, ENA_READ_PERIOD, EnaCollector, Ethtool},
        flows::FlowsCollector,
        linklocal::LinkLocalCollector,
        udp::UdpQueueCollector,
    },
    devices::{self, Departed, Devices},
    housekeeping::{self, Expiry, ResolverNames, SenderGatherer, Sweeper, sweep::SweptTables},
    http,
    imds::{self, Imds},
    kernel::{self, KernelFacts},
    loader::{self, Maps, Sizes, maps::Addresses, pins},
    model::{
        allowance::Allowance,
        dns::{AmazonResolvers, RankedClients},
        flows::{FlowCounts, Timeouts},
        instance::TcpEstablished,
        linklocal::{self, Senders},
        resolvers::ResolverSlots,
    },
    watch::{self, SlotArrays, Watcher},
    webconfig::Web,
};

/// Where the firmware describes the machine.
const DMI: &str = "/sys/class/dmi/id";

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cli: Cli) -> Result<()> {
    // Bind first: a port in use, a bad address or a bad web configuration fails before
    // anything is attached.
    let listener = crate::http::listen(cli.listen)
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;
    let web = match &cli.web_config_file {
        Some(path) => Web::load(path)?,
        None => Web::default(),
    };

    let facts = KernelFacts::read(Path::new(kernel::BTF_PATH))?;
    let sizes = Sizes::with_flows(cli.flow_table_size);
    let pins = pins::prepare(&cli.state_dir, &loader::layout(&facts, sizes)?)?;
    let loaded = loader::load(&facts, sizes, pins.as_deref())?;

    warn_unmatched(&cli.devices)?;

    let Wired {
        registry,
        mut watcher,
        sweeper,
        expiry,
        gatherer,
        amazon,
        addrs,
        names,
        tcp_established,
    } = wire(&cli, &facts, loaded)?;
    let devices = watcher.devices().clone();
    let attachments = watcher.attachments().clone();
    // Devices a previous agent monitored keep their slots, and so their counts.
    watcher.adopt_pinned()?;
    watcher.reconcile()?;
    if devices.snapshot().is_empty() {
        warn!("no devices to monitor yet; drops are counted as device=\"other\"");
    }
    let mut tasks = vec![tokio::spawn(watch::run(watcher))];
    let health = housekeeping::start(sweeper, expiry, gatherer)?;

    tasks.extend(call_imds(
        &cli,
        devices,
        amazon,
        addrs,
        names,
        tcp_established,
    )?);

    let mut state = http::State::new(registry, attachments, web);
    state.health = health;
    let state = Arc::new(state);
    tasks.push(tokio::spawn(http::serve(listener, Arc::clone(&state))));
    state.started.store(true, Ordering::Release);
    info!("serving /metrics on {}", cli.listen);

    until_signalled().await?;
    // The watcher owns the programs: ending its task drops every link, which detaches
    // the programs.
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    Ok(())
}

/// Says which `--device` patterns match no interface here (yet: one may come later).
fn warn_unmatched(globs: &[glob::Pattern]) -> Result<()> {
    let all = devices::interfaces()?;
    for glob in globs {
        if !all.iter().any(|(name, _)| glob.matches(name)) {
            warn!("--device {glob}: no such interface in this network namespace");
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn until_signalled() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: detaching and exiting"),
        _ = int.recv() => info!("SIGINT: detaching and exiting"),
    }
    Ok(())
}

/// The object's programs and maps, each handed to its one owner.
struct Wired {
    registry: Registry,
    watcher: Watcher,
    sweeper: Sweeper,
    expiry: Expiry,
    gatherer: SenderGatherer,
    amazon: AmazonResolvers,
    addrs: Addresses,
    names: ResolverNames,
    /// Learned from IMDS where the flag does not set it.
    tcp_established: TcpEstablished,
}

/// Hands every map to its owner: the collectors (read), the watcher (device slots), the
/// housekeeping (expiry, sweep), the IMDS labeller (link-local addresses).
#[expect(
    clippy::too_many_lines,
    reason = "every map to its owner in one place, to be read in one glance"
)]
fn wire(cli: &Cli, facts: &KernelFacts, loaded: loader::Loaded) -> Result<Wired> {
    let loader::Loaded { mut programs, maps } = loaded;
    // Queries in flight that began before this instant were left by an agent that
    // stopped: their answers may have come while no program watched.
    let watching_since_ns = housekeeping::monotonic_ns();
    let tcp_established = TcpEstablished::new(cli.tcp_established_timeout);
    programs.attach_tracepoints(facts);
    if let Err(e) = programs.load_classifiers() {
        log::error!("{e:#}");
    }
    let Maps {
        monitored,
        map_full,
        flows,
        flows_created,
        flow_table_full,
        dns_inflight,
        dns_pending,
        dns_clients,
        dns,
        dns_seen,
        drops,
        udp_queue_drops,
        addrs,
        ll_packets,
        ll_seconds,
        ll_senders,
        dns_tcp_unread,
    } = maps;
    let senders = Arc::new(Mutex::new(Senders::new(usize::from(cli.top))));
    let amazon = linklocal_services(&addrs, &cli.linklocal_resolvers)?;
    let devices = Devices::default();
    let flow_counts = FlowCounts::default();
    let ranked = RankedClients::default();
    let top = usize::from(cli.top);
    // The names a previous agent gave, continued; Amazon's resolvers named from the start.
    let now = housekeeping::monotonic_s().into();
    // A resolver is not quiet while its queries still wait: it stays named at least as
    // long as a query it was asked can wait.
    let grace = Sweeper::grace(cli.dns_timeout);
    let slots = ResolverSlots::new(
        amazon.clone(),
        &addrs.resolvers(),
        cli.resolver_idle.as_secs().max(grace),
        grace,
        now,
    );
    let amazon_dns = linklocal::SERVICES
        .iter()
        .filter(|(_, s)| *s == LinkLocalService::Dns)
        .map(|(ip, _)| *ip)
        .chain(cli.linklocal_resolvers.iter().copied());
    let names = ResolverNames::new(slots, addrs.clone(), dns.clone());
    names.name_amazon(amazon_dns, now)?;

    let mut registry = Registry::with_prefix("eni_monitor");
    registry.register_collector(Box::new(AgentCollector {
        attachments: programs.attachments().clone(),
        devices: devices.clone(),
        map_full,
    }));
    registry.register_collector(Box::new(DropsCollector {
        map: Mutex::new(drops),
        devices: devices.clone(),
        departed: Departed::default(),
        reasons: facts.reasons.clone(),
    }));
    registry.register_collector(Box::new(UdpQueueCollector {
        drops: udp_queue_drops,
    }));
    registry.register_collector(Box::new(DnsCollector {
        dns: dns.clone(),
        tcp_unread: dns_tcp_unread,
        departed: Departed::default(),
        names: names.clone(),
        ranked: ranked.clone(),
        devices: devices.clone(),
    }));
    registry.register_collector(Box::new(ConntrackCollector::new()));
    registry.register_collector(Box::new(EnaCollector {
        stats: AtMostEvery::new(Ethtool, ENA_READ_PERIOD),
        devices: devices.clone(),
        flows: flow_counts.clone(),
        allowance: Mutex::new(Allowance::new(cli.conntrack_allowance)),
    }));
    let timeouts = Timeouts {
        tcp_established: tcp_established.get(),
        udp: cli.udp_timeout,
        udp_stream: cli.udp_stream_timeout,
    };
    registry.register_collector(Box::new(FlowsCollector {
        created: flows_created.clone(),
        table_full: flow_table_full,
        counts: flow_counts.clone(),
        devices: devices.clone(),
        timeouts,
        tcp_established: tcp_established.clone(),
    }));
    registry.register_collector(Box::new(LinkLocalCollector {
        packets: ll_packets.clone(),
        seconds: ll_seconds.clone(),
        senders: Arc::clone(&senders),
        devices: devices.clone(),
    }));

    Ok(Wired {
        registry,
        sweeper: Sweeper::new(
            SweptTables {
                inflight: dns_inflight,
                pending: dns_pending,
                clients: dns_clients,
                seen: dns_seen,
                dns,
            },
            names.clone(),
            cli.dns_timeout,
            ranked,
            top,
            watching_since_ns,
        ),
        gatherer: SenderGatherer {
            tables: ll_senders,
            senders,
        },
        expiry: Expiry {
            flows,
            timeouts,
            tcp_established: tcp_established.clone(),
            counts: flow_counts,
            devices: devices.clone(),
            top,
        },
        watcher: Watcher::new(
            programs,
            monitored,
            cli.devices.clone(),
            devices,
            SlotArrays {
                linklocal_packets: ll_packets,
                linklocal_seconds: ll_seconds,
                flows_created,
            },
        ),
        amazon,
        addrs,
        names,
        tcp_established,
    })
}

/// Where IMDS is to be called: labels the devices with their ENI ids (each VPC resolver
/// it names is counted as the link-local resolver from then on), and learns the instance
/// type for EC2's default timeouts there.
fn call_imds(
    cli: &Cli,
    devices: Devices,
    amazon: AmazonResolvers,
    addrs: Addresses,
    names: ResolverNames,
    tcp_established: TcpEstablished,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(url) = imds::endpoint(cli.imds_endpoint.as_deref(), Path::new(DMI)) else {
        info!(
            "not an EC2 instance (DMI): IMDS is not called, ENI ids stay empty and TCP established connections are tracked for {}s; --imds-endpoint calls it anyway",
            tcp_established.get().as_secs()
        );
        return Ok(Vec::new());
    };
    let imds = Imds::new(&url, Duration::from_secs(1))?;
    let learn = tokio::spawn(imds::learn_instance_type(imds.clone(), tcp_established));
    let label = tokio::spawn(imds::label_enis(imds, devices, move |resolver| {
        let ip = IpAddr::V4(resolver);
        if !amazon.add(ip) {
            return;
        }
        if let Err(e) = addrs.set_service(ip, LinkLocalService::Dns) {
            warn!("{e:#}");
        }
        // Amazon's resolver is named from the moment it is known (a failure is logged).
        let _ = names.name_amazon([ip], housekeeping::monotonic_s().into());
    }));
    Ok(vec![learn, label])
}

/// The link-local service addresses, and the resolvers the command line adds, in the
/// kernel's `LINKLOCAL` map and among Amazon's resolvers.
fn linklocal_services(addrs: &Addresses, extra: &[IpAddr]) -> Result<AmazonResolvers> {
    let amazon = AmazonResolvers::default();
    let extra = extra.iter().map(|ip| (*ip, LinkLocalService::Dns));
    for (ip, service) in linklocal::SERVICES.into_iter().chain(extra) {
        if service == LinkLocalService::Dns {
            amazon.add(ip);
        }
        addrs.set_service(ip, service)?;
    }
    Ok(amazon)
}
