//! The agent: the object loaded, its state continued, the devices watched, the periodic
//! work started, the collectors registered and served, until SIGTERM.

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
        ena::{EnaCollector, Ethtool},
        flows::FlowsCollector,
        linklocal::LinkLocalCollector,
        udp::UdpQueueCollector,
    },
    devices::{self, Devices},
    housekeeping::{self, Expiry, Resolvers, Sweeper},
    http,
    imds::{self, Imds},
    kernel::{self, KernelFacts},
    loader::{self, Maps, Sizes, maps::LinkLocalAddrs, pins},
    model::{
        allowance::Allowance,
        dns::{AmazonResolvers, RecentClients},
        flows::{FlowCounts, Timeouts},
        linklocal,
    },
    watch::{self, SlotArrays, Watcher},
};

/// Where the firmware describes the machine.
const DMI: &str = "/sys/class/dmi/id";

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cli: Cli) -> Result<()> {
    // Bind first: a port in use or a bad address fails before anything is attached.
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;

    let facts = KernelFacts::read(Path::new(kernel::BTF_PATH))?;
    let pins = pins::prepare(&cli.state_dir, cli.flow_table_size)?;
    let loaded = loader::load(
        &facts,
        Sizes::with_flows(cli.flow_table_size),
        pins.as_deref(),
    )?;

    let all = devices::interfaces()?;
    for glob in &cli.devices {
        if !all.iter().any(|(name, _)| glob.matches(name)) {
            warn!("--device {glob}: no such interface in this network namespace");
        }
    }

    let Wired {
        registry,
        mut watcher,
        sweeper,
        expiry,
        amazon,
        linklocal,
    } = wire(&cli, &facts, loaded)?;
    let devices = watcher.devices.clone();
    let attachments = watcher.programs.attachments().clone();
    // Devices a previous agent monitored keep their slots, and so their counts.
    watcher.adopt_pinned()?;
    watcher.reconcile()?;
    if devices.snapshot().is_empty() {
        warn!("no devices to monitor yet; drops are counted as device=\"other\"");
    }
    let mut tasks = vec![tokio::spawn(watch::run(watcher))];
    housekeeping::start(sweeper, expiry)?;

    tasks.extend(label_enis(&cli, devices, amazon, linklocal)?);

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
    // The watcher owns the programs: ending its task drops every link, which detaches
    // the programs.
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    Ok(())
}

/// The object's programs and maps, each handed to its one owner.
struct Wired {
    registry: Registry,
    watcher: Watcher,
    sweeper: Sweeper,
    expiry: Expiry,
    amazon: AmazonResolvers,
    linklocal: LinkLocalAddrs,
}

/// Hands every map to its owner: the collectors (read), the watcher (device slots), the
/// housekeeping (expiry, sweep), the IMDS labeller (link-local addresses).
#[expect(
    clippy::too_many_lines,
    reason = "every map to its owner in one place, to be read in one glance"
)]
fn wire(cli: &Cli, facts: &KernelFacts, loaded: loader::Loaded) -> Result<Wired> {
    let loader::Loaded { mut programs, maps } = loaded;
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
        dns_counts,
        dns_latency,
        dns_unanswered,
        dns_resolvers,
        drops,
        udp_queue_drops,
        mut linklocal,
        ll_packets,
        ll_seconds,
    } = maps;
    let amazon = linklocal_services(&mut linklocal, &cli.linklocal_resolvers)?;
    let devices = Devices::default();
    let flow_counts = FlowCounts::default();
    let recent = RecentClients::default();
    let top = usize::from(cli.top);

    let mut registry = Registry::with_prefix("eni_monitor");
    registry.register_collector(Box::new(AgentCollector {
        attachments: programs.attachments().clone(),
        devices: devices.clone(),
        map_full,
    }));
    registry.register_collector(Box::new(DropsCollector {
        map: drops,
        devices: devices.clone(),
        reasons: facts.reasons.clone(),
    }));
    registry.register_collector(Box::new(UdpQueueCollector {
        drops: udp_queue_drops,
    }));
    registry.register_collector(Box::new(DnsCollector {
        counts: dns_counts,
        latency: dns_latency,
        unanswered: dns_unanswered.clone(),
        resolvers: Arc::new(Resolvers::new(amazon.clone(), dns_resolvers)),
        recent: recent.clone(),
        top,
        devices: devices.clone(),
    }));
    registry.register_collector(Box::new(ConntrackCollector::new()));
    registry.register_collector(Box::new(EnaCollector {
        stats: Ethtool,
        devices: devices.clone(),
        flows: flow_counts.clone(),
        allowance: Mutex::new(Allowance::new(cli.conntrack_allowance)),
    }));
    registry.register_collector(Box::new(FlowsCollector {
        created: flows_created.clone(),
        table_full: flow_table_full,
        counts: flow_counts.clone(),
        devices: devices.clone(),
    }));
    registry.register_collector(Box::new(LinkLocalCollector {
        packets: ll_packets.clone(),
        seconds: ll_seconds.clone(),
        devices: devices.clone(),
    }));

    Ok(Wired {
        registry,
        sweeper: Sweeper {
            inflight: dns_inflight,
            pending: dns_pending,
            timeout: cli.dns_timeout,
            unanswered: dns_unanswered,
            recent,
        },
        expiry: Expiry {
            flows,
            timeouts: Timeouts {
                tcp_established: cli.tcp_established_timeout,
                udp: cli.udp_timeout,
                udp_stream: cli.udp_stream_timeout,
            },
            counts: flow_counts,
            devices: devices.clone(),
            top,
        },
        watcher: Watcher {
            programs,
            monitored,
            globs: cli.devices.clone(),
            devices,
            slots: SlotArrays {
                linklocal_packets: ll_packets,
                linklocal_seconds: ll_seconds,
                flows_created,
            },
            links: HashMap::new(),
        },
        amazon,
        linklocal,
    })
}

/// Labels the devices with their ENI ids from IMDS, where IMDS is to be called; each
/// VPC resolver it names is counted as the link-local resolver from then on.
fn label_enis(
    cli: &Cli,
    devices: Devices,
    amazon: AmazonResolvers,
    mut linklocal: LinkLocalAddrs,
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
            let ip = IpAddr::V4(resolver);
            if amazon.add(ip)
                && let Err(e) = linklocal.add(ip, LinkLocalService::Dns)
            {
                warn!("{e:#}");
            }
        },
    ))))
}

/// The link-local service addresses, and the resolvers the command line adds, in the
/// kernel's `LINKLOCAL` map and among Amazon's resolvers.
fn linklocal_services(linklocal: &mut LinkLocalAddrs, extra: &[IpAddr]) -> Result<AmazonResolvers> {
    let amazon = AmazonResolvers::default();
    let extra = extra.iter().map(|ip| (*ip, LinkLocalService::Dns));
    for (ip, service) in linklocal::SERVICES.into_iter().chain(extra) {
        if service == LinkLocalService::Dns {
            amazon.add(ip);
        }
        linklocal.add(ip, service)?;
    }
    Ok(amazon)
}
