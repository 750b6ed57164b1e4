//! The simulated node: network namespaces and veth pairs standing in for an EKS node,
//! its ENIs and the VPC behind them, with helpers to run the real `monitor` binary
//! inside the node namespace and scrape it. Everything created is removed on drop,
//! also when a test fails. One module per concern: `netns` (namespaces), `node` (the
//! node, its ENIs and pods), `agent` (the agent process and its state), `traffic` (what
//! tests send), and the servers, resolvers and machines the tests run beside it.
#![allow(
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::float_cmp
)]

pub mod agent;
pub mod busy;
pub mod dns;
pub mod dns_tcp;
pub mod fleet;
pub mod floor;
pub mod golden;
pub mod imds;
pub mod incident;
pub mod kernels;
pub mod netns;
pub mod node;
pub mod paging;
pub mod panels;
mod root;
pub mod servers;
pub mod timeline;
pub mod traffic;
pub mod victoria;
pub mod vm;
pub mod wire;

use std::{process::Command, sync::atomic::Ordering};

pub use agent::{Agent, BpfState, HOOKS, Scrape, monitor_bin, rss_mib};
pub use netns::{Netns, enter};
pub use node::{Eni, Pod, SimNode};
pub use root::require_root;
pub use traffic::{addr, http_get, monotonic, send_udp, set_rcvbuf};

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`, panicking with its output when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip` with arguments split on whitespace.
pub fn ip(args: &str) -> String {
    sh(Command::new("ip").args(args.split_whitespace()))
}

/// A thread that runs until dropped: `work` is handed the stop flag to poll.
pub struct Background {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn spawn(work: impl FnOnce(&std::sync::atomic::AtomicBool) + Send + 'static) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || work(&flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every `PromQL` expression of a Grafana dashboard, in panel order.
pub fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    panels::panels(dash)
        .into_iter()
        .flat_map(|p| p.exprs)
        .collect()
}
