//! eni-monitor: a node agent that warns before an ENI runs out of its EC2 allowances or
//! DNS packets start to vanish.

mod btf;
mod cli;
mod collectors;
mod devices;
mod http;
mod kernel;
mod programs;
mod tracefs;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::{AtomicBool, Ordering}},
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    collectors::{agent::{AgentCollector, Attachments}, drops::DropsCollector},
    devices::Devices,
    kernel::KernelFacts,
};

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
    let mut ebpf = programs::load(&facts)?;

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
    let devices = Devices::default();
    devices.replace(selected);

    let attachments = Attachments::default();
    programs::attach_kfree_skb(&mut ebpf, &facts, &attachments);

    let mut registry = Registry::with_prefix("eni_monitor");
    registry.register_collector(Box::new(AgentCollector { attachments: attachments.clone() }));
    registry.register_collector(Box::new(DropsCollector {
        map: programs::take_drops(&mut ebpf)?,
        devices: devices.clone(),
        reasons: facts.reasons.clone(),
    }));

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
    // Dropping the object closes every link, which detaches the programs.
    drop(ebpf);
    Ok(())
}
