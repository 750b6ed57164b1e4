//! Debian's Prometheus and Alertmanager inside a namespace, scraping an agent every
//! second with the shipped rules, unchanged: paging end to end.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Netns, http_get};

pub const PROMETHEUS: &str = "127.0.0.1:9090";
pub const ALERTMANAGER: &str = "127.0.0.1:9093";

pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start(ns: &Netns, program: &str, args: &[String]) -> Daemon {
    Daemon(
        ns.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}")),
    )
}

/// Debian's Prometheus in `ns` with `config`, its files in `dir`, on `PROMETHEUS`.
fn prometheus(ns: &Netns, dir: &Path, config: &str) -> Daemon {
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    start(
        ns,
        "prometheus",
        &[
            format!("--config.file={}", d("prometheus.yml")),
            format!("--storage.tsdb.path={}", d("tsdb")),
            format!("--web.listen-address={PROMETHEUS}"),
        ],
    )
}

/// Debian's Alertmanager in `ns` with `dir`'s `alertmanager.yml`, on `ALERTMANAGER`.
fn alertmanager(ns: &Netns, dir: &Path) -> Daemon {
    let d = |p: &str| dir.join(p).display().to_string();
    start(
        ns,
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", d("alertmanager.yml")),
            format!("--storage.path={}", d("am")),
            format!("--web.listen-address={ALERTMANAGER}"),
            "--cluster.listen-address=".into(),
        ],
    )
}

/// Alertmanager alone in `ns`, with the shipped inhibit rules and no receiver: what it
/// holds is read from its API. Stopped on drop, then its files removed.
pub struct Alertmanager {
    ns_name: String,
    _daemon: Daemon,
    _dir: DirGuard,
}

impl Alertmanager {
    pub fn start(ns: &Netns) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-alertmanager", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("alertmanager.yml"),
            format!(
                "route:\n  receiver: none\n  group_by: ['...']\nreceivers:\n  - name: none\n{}",
                inhibit_rules()
            ),
        )
        .unwrap();
        let daemon = alertmanager(ns, &dir);
        wait_for("Alertmanager", Duration::from_secs(30), || {
            get_json(ns, ALERTMANAGER, "/api/v2/status").is_some()
        });
        Self {
            ns_name: ns.name.clone(),
            _daemon: daemon,
            _dir: DirGuard(dir),
        }
    }

    /// Every alert it holds that has not ended, paged or inhibited.
    pub fn alerts(&self, ns: &Netns) -> Vec<Value> {
        assert_eq!(ns.name, self.ns_name);
        get_json(ns, ALERTMANAGER, "/api/v2/alerts")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }
}

/// The shipped inhibit rules, as they are.
fn inhibit_rules() -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/alerts/alertmanager-inhibit.yml"),
    )
    .unwrap()
}

/// A directory removed on drop.
pub(crate) struct DirGuard(pub(crate) PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prometheus and Alertmanager in `ns`; stopped on drop, then their files removed.
pub struct Paging {
    ns_name: String,
    pager: Pager,
    _alertmanager: Daemon,
    _prometheus: Daemon,
    dir: DirGuard,
}

/// Waits until `f` holds, for at most `limit`; returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    started.elapsed()
}

pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Paging {
    /// Starts both, Prometheus scraping `agent` (labelled `node`), and waits until the
    /// first scrape and Alertmanager answer.
    pub fn start(ns: &Netns, agent: SocketAddr, node: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-paging", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/alerts/rules.yml")
            .canonicalize()
            .unwrap();
        // Every alert its own page (`group_by: ['...']`, as many on-call setups route),
        // delivered to a webhook that keeps them; the shipped inhibit rules, unchanged.
        let pager = Pager::start(ns);
        let inhibit = inhibit_rules();
        std::fs::write(
            dir.join("alertmanager.yml"),
            format!(
                "route:\n  receiver: pager\n  group_by: ['...']\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: pager\n    webhook_configs:\n      - url: 'http://{PAGER}/'\n{inhibit}"
            ),
        )
        .unwrap();
        let alertmanager = alertmanager(ns, &dir);
        // The evaluation interval is the test's; the rules are the shipped ones, unchanged.
        let prometheus = prometheus(
            ns,
            &dir,
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{ALERTMANAGER}']\nscrape_configs:\n  - job_name: eni-monitor\n    static_configs:\n      - targets: ['{agent}']\n        labels:\n          node: {node}\n",
                rules.display(),
            ),
        );
        let paging = Self {
            ns_name: ns.name.clone(),
            pager,
            _alertmanager: alertmanager,
            _prometheus: prometheus,
            dir: DirGuard(dir),
        };
        wait_for(
            "Prometheus to scrape the agent",
            Duration::from_mins(1),
            || {
                paging
                    .query(ns, "up{job=\"eni-monitor\"}")
                    .is_some_and(|v| v["data"]["result"][0]["value"][1] == "1")
            },
        );
        wait_for("Alertmanager", Duration::from_secs(30), || {
            get_json(ns, ALERTMANAGER, "/api/v2/status").is_some()
        });
        paging
    }

    /// The values of label `label` on the series `selector` matches, as Grafana's
    /// `label_values(selector, label)` asks for them.
    pub fn label_values(&self, ns: &Netns, selector: &str, label: &str) -> Vec<String> {
        assert_eq!(ns.name, self.ns_name);
        get_json(
            ns,
            PROMETHEUS,
            &format!(
                "/api/v1/label/{label}/values?match[]={}",
                percent_encode(selector)
            ),
        )
        .and_then(|v| v["data"].as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
    }

    /// The pages delivered so far: each notification, as Alertmanager's webhook sends it.
    pub fn pages(&self) -> Vec<Value> {
        self.pager.pages()
    }

    /// The alerts Alertmanager holds named `alertname` whose labels include `labels`
    /// and that have not ended, paged or not (an inhibited alert is `suppressed`).
    pub fn received(&self, ns: &Netns, alertname: &str, labels: &[(&str, &str)]) -> Vec<Value> {
        assert_eq!(ns.name, self.ns_name);
        Self::alerts(ns, alertname, labels, &["active", "suppressed"])
    }

    /// The alerts Alertmanager holds named `alertname` whose labels include `labels`
    /// and that have not ended, and pages.
    pub fn active(&self, ns: &Netns, alertname: &str, labels: &[(&str, &str)]) -> Vec<Value> {
        assert_eq!(ns.name, self.ns_name);
        Self::alerts(ns, alertname, labels, &["active"])
    }

    fn alerts(ns: &Netns, alertname: &str, labels: &[(&str, &str)], states: &[&str]) -> Vec<Value> {
        let Some(alerts) = get_json(ns, ALERTMANAGER, "/api/v2/alerts") else {
            return Vec::new();
        };
        let now = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
        alerts
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == alertname)
            .filter(|a| labels.iter().all(|(k, v)| a["labels"][*k] == *v))
            .filter(|a| states.iter().any(|s| a["status"]["state"] == *s))
            .filter(|a| {
                // Prometheus sends endsAt in the past once the alert resolved.
                let ends = a["endsAt"].as_str().unwrap_or("");
                ends.is_empty() || ends > now.as_str()
            })
            .collect()
    }

    /// Where the daemons keep their files.
    pub fn dir(&self) -> &PathBuf {
        &self.dir.0
    }
}

/// Where Alertmanager delivers pages, in the paging namespace.
const PAGER: &str = "127.0.0.1:9099";

/// A webhook receiver that keeps every notification Alertmanager delivers.
struct Pager {
    pages: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _server: crate::Background,
}

impl Pager {
    fn start(ns: &Netns) -> Self {
        let listener = ns.run(|| std::net::TcpListener::bind(PAGER).unwrap());
        listener.set_nonblocking(true).unwrap();
        let pages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&pages);
        let server = crate::Background::spawn(move |stop| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Some(page) = receive(conn) {
                            kept.lock().unwrap().push(page);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            pages,
            _server: server,
        }
    }

    fn pages(&self) -> Vec<Value> {
        self.pages.lock().unwrap().clone()
    }
}

/// One webhook request: its JSON body, answered 200.
fn receive(conn: std::net::TcpStream) -> Option<Value> {
    use std::io::{BufRead as _, Read as _, Write as _};
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = std::io::BufReader::new(conn.try_clone().ok()?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let mut conn = conn;
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    serde_json::from_slice(&body).ok()
}

pub(crate) fn get_json(ns: &Netns, addr: &str, path: &str) -> Option<Value> {
    let (code, body) = http_get(ns, addr.parse().ok()?, path)?;
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// A range query's series from the Prometheus-compatible API at `addr` in `ns`,
/// `[start, end]` in Unix seconds every `step` seconds: each series' labels and its
/// points (Unix seconds, value; `NaN` kept out).
pub(crate) fn query_range(
    ns: &Netns,
    addr: &str,
    expr: &str,
    (start, end, step): (f64, f64, f64),
) -> Vec<crate::panels::Series> {
    let v = get_json(
        ns,
        addr,
        &format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            percent_encode(expr)
        ),
    )
    .unwrap_or_else(|| panic!("{addr} refused the range query {expr}"));
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let points = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let t = p[0].as_f64()?;
                    let v: f64 = p[1].as_str()?.parse().ok()?;
                    (!v.is_nan()).then_some((t, v))
                })
                .collect();
            (s["metric"].clone(), points)
        })
        .collect()
}

/// A Prometheus-compatible engine's HTTP API, served in the test's namespace: Debian's
/// Prometheus (`Paging`, `Prometheus`) or `VictoriaMetrics` (`Victoria`).
pub trait Engine {
    /// The namespace the engine serves in, and its API's address there.
    fn endpoint(&self) -> (&str, &'static str);

    /// A JSON answer of the API at `path` (`/api/v1/...`), asked from `ns`.
    fn api(&self, ns: &Netns, path: &str) -> Option<Value> {
        let (name, addr) = self.endpoint();
        assert_eq!(ns.name, name, "the engine serves in another namespace");
        get_json(ns, addr, path)
    }

    /// An instant query's JSON answer.
    fn query(&self, ns: &Netns, expr: &str) -> Option<Value> {
        self.api(ns, &format!("/api/v1/query?query={}", percent_encode(expr)))
    }

    /// A range query's series, `[start, end]` in Unix seconds every `step` seconds:
    /// each series' labels and its points (Unix seconds, value; `NaN` kept out).
    fn query_range(
        &self,
        ns: &Netns,
        expr: &str,
        range: (f64, f64, f64),
    ) -> Vec<crate::panels::Series> {
        let (name, addr) = self.endpoint();
        assert_eq!(ns.name, name, "the engine serves in another namespace");
        query_range(ns, addr, expr, range)
    }
}

impl Engine for Paging {
    fn endpoint(&self) -> (&str, &'static str) {
        (&self.ns_name, PROMETHEUS)
    }
}

impl Engine for Prometheus {
    fn endpoint(&self) -> (&str, &'static str) {
        (&self.ns_name, PROMETHEUS)
    }
}

/// Debian's Prometheus alone in `ns`, scraping every second with `job` (one
/// `scrape_configs` entry, YAML, indented as a list item); stopped on drop.
pub struct Prometheus {
    ns_name: String,
    daemon: Daemon,
    dir: DirGuard,
}

impl Prometheus {
    pub fn start(ns: &Netns, job: &str) -> Self {
        Self::with_config(
            ns,
            &format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{job}"),
        )
    }

    /// Debian's Prometheus in `ns` with the whole configuration `config`.
    pub fn with_config(ns: &Netns, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let daemon = prometheus(ns, &dir, config);
        Self {
            ns_name: ns.name.clone(),
            daemon,
            dir: DirGuard(dir),
        }
    }

    /// The process id, for its resident memory.
    pub fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    /// Its directory (configuration and data), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Replaces the configuration and has Prometheus read it again (SIGHUP), as an
    /// operator's reload does: the head and the rules' state stay.
    pub fn reload(&self, config: &str) {
        std::fs::write(self.dir.0.join("prometheus.yml"), config).unwrap();
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: a signal to the child this struct started and still owns.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }
}
