//! `monitor`: parse the command line, then run the agent, `status` or `cleanup`.

use log::{error, info};
use monitor::{
    agent,
    cli::{Cli, Command},
    loader::pins,
    status,
};

fn main() {
    let cli = Cli::parse_or_exit();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match &cli.command {
        // A screen for a person: its error is one plain line, not a log record.
        Some(Command::Status { endpoint, interval }) => match status::run(endpoint, *interval) {
            Ok(screen) => {
                print!("{screen}");
                Ok(())
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        },
        Some(Command::Cleanup) => pins::cleanup(&cli.state_dir).map(|removed| {
            if removed.is_empty() {
                info!("nothing to remove at {}", cli.state_dir.display());
            }
            for path in removed {
                info!("removed {}", path.display());
            }
        }),
        None => run(cli),
    };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
    runtime.block_on(agent::run(cli))
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
