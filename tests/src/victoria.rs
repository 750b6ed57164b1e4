//! The second engine, sharded as fleets past one Prometheus run it: two of Debian's
//! `vmagent`s sharing the scrape targets (`-promscrape.cluster.membersCount=2`), both
//! writing to one `VictoriaMetrics`, and `vmalert` evaluating the shipped rules, unchanged,
//! against it and sending to an Alertmanager.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use crate::{
    Netns,
    paging::{Daemon, DirGuard, Engine, get_json, start, wait_for},
};

/// `VictoriaMetrics`'s own address: remote write, queries.
pub const VICTORIA: &str = "127.0.0.1:8428";
/// The two scrapers, member 0 and member 1.
pub const VMAGENTS: [&str; 2] = ["127.0.0.1:8429", "127.0.0.1:8431"];
/// vmalert's API.
pub const VMALERT: &str = "127.0.0.1:8880";

/// `VictoriaMetrics`, two sharded vmagents and vmalert in a namespace; stopped on drop,
/// then their files removed.
pub struct Victoria {
    ns_name: String,
    vmalert: Daemon,
    agents: [Daemon; 2],
    store: Daemon,
    _dir: DirGuard,
}

impl Victoria {
    /// Starts them in `ns`: the vmagents scrape `scrape_configs` (YAML, the list under
    /// that key) every `interval_s`, vmalert evaluates `deploy/alerts/rules.yml` as often
    /// and notifies `alertmanager` (an address in `ns`).
    pub fn start(ns: &Netns, scrape_configs: &str, interval_s: u64, alertmanager: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-victoria", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = |p: &str| dir.join(p).display().to_string();
        // Queries see a sample as soon as it is written (the default hides the last 30 s,
        // for a cluster whose inserts arrive late), so vmalert reads what was just scraped.
        let store = start(
            ns,
            "victoria-metrics",
            &[
                format!("-storageDataPath={}", d("data")),
                format!("-httpListenAddr={VICTORIA}"),
                "-search.latencyOffset=0s".into(),
                "-search.disableCache".into(),
                "-retentionPeriod=1d".into(),
            ],
        );
        std::fs::write(
            dir.join("scrape.yml"),
            format!("global:\n  scrape_interval: {interval_s}s\nscrape_configs:\n{scrape_configs}"),
        )
        .unwrap();
        let agents = [0, 1].map(|member| {
            start(
                ns,
                "vmagent",
                &[
                    format!("-promscrape.config={}", d("scrape.yml")),
                    "-promscrape.cluster.membersCount=2".into(),
                    format!("-promscrape.cluster.memberNum={member}"),
                    format!("-httpListenAddr={}", VMAGENTS[member]),
                    format!("-remoteWrite.url=http://{VICTORIA}/api/v1/write"),
                    format!(
                        "-remoteWrite.tmpDataPath={}",
                        d(&format!("vmagent{member}"))
                    ),
                    "-remoteWrite.flushInterval=1s".into(),
                ],
            )
        });
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/alerts/rules.yml")
            .canonicalize()
            .unwrap();
        let vmalert = start(
            ns,
            "vmalert",
            &[
                format!("-rule={}", rules.display()),
                format!("-datasource.url=http://{VICTORIA}"),
                format!("-remoteWrite.url=http://{VICTORIA}"),
                format!("-remoteRead.url=http://{VICTORIA}"),
                "-remoteWrite.flushInterval=1s".into(),
                format!("-notifier.url=http://{alertmanager}"),
                format!("-evaluationInterval={interval_s}s"),
                format!("-httpListenAddr={VMALERT}"),
            ],
        );
        let v = Self {
            ns_name: ns.name.clone(),
            vmalert,
            agents,
            store,
            _dir: DirGuard(dir),
        };
        wait_for(
            "VictoriaMetrics, vmagent and vmalert",
            Duration::from_mins(1),
            || {
                get_json(ns, VICTORIA, "/api/v1/labels").is_some()
                    && VMAGENTS
                        .iter()
                        .all(|a| crate::http_get(ns, a.parse().unwrap(), "/metrics").is_some())
                    && get_json(ns, VMALERT, "/api/v1/rules").is_some()
            },
        );
        v
    }

    /// How many targets scraper `member` scrapes and found up.
    pub fn targets_up(&self, ns: &Netns, member: usize) -> usize {
        assert_eq!(ns.name, self.ns_name);
        get_json(ns, VMAGENTS[member], "/api/v1/targets")
            .and_then(|v| v["data"]["activeTargets"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|t| t["health"] == "up")
            .count()
    }

    /// vmalert's rules as its Prometheus-compatible `/api/v1/rules` gives them.
    pub fn rules(&self, ns: &Netns) -> Option<Value> {
        assert_eq!(ns.name, self.ns_name);
        get_json(ns, VMALERT, "/api/v1/rules")
    }

    /// The process ids of `VictoriaMetrics`, the two vmagents and vmalert, for their memory.
    pub fn pids(&self) -> [u32; 4] {
        [
            self.store.0.id(),
            self.agents[0].0.id(),
            self.agents[1].0.id(),
            self.vmalert.0.id(),
        ]
    }
}

impl Engine for Victoria {
    fn endpoint(&self) -> (&str, &'static str) {
        (&self.ns_name, VICTORIA)
    }
}
