//! `--web-config-file`: Debian's Prometheus scrapes the agent over TLS, with a client
//! certificate and a password; a client without them, or that trusts another CA, is
//! refused; a bad file stops the agent with one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::Duration,
};

use integration_tests::paging::Engine as _;
use integration_tests::{
    SimNode, monitor_bin,
    paging::{Prometheus, wait_for},
    require_root,
};

const LISTEN: &str = "127.0.0.1:9435";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A new P-256 key in `name.key`, and with `then` a self-signed certificate
/// (`-x509 -out name.crt`) or a request (`-out name.csr`).
fn key_and(dir: &Path, name: &str, then: &[&str]) {
    let key = format!("{name}.key");
    let subject = format!("/CN={name}");
    let args = [
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ][..],
        &["-keyout", &key, "-subj", &subject],
        then,
    ]
    .concat();
    openssl(dir, &args);
}

/// A CA: `name.crt`, `name.key`.
fn ca(dir: &Path, name: &str) {
    key_and(
        dir,
        name,
        &["-x509", "-days", "2", "-out", &format!("{name}.crt")],
    );
}

/// A certificate for `name` signed by `ca`, with the extensions `ext`.
fn signed(dir: &Path, name: &str, ca: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    key_and(dir, name, &["-out", &format!("{name}.csr")]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// The agent in the node's namespace with a web configuration; killed on drop.
struct Running(Child);

impl Running {
    fn start(sim: &SimNode, web: &Path) -> Self {
        Self(
            sim.node
                .command(monitor_bin().to_str().unwrap())
                .args(["--listen", LISTEN, "--device", "eth0"])
                .args(["--imds-endpoint", "http://127.0.0.1:1", "--web-config-file"])
                .arg(web)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// curl in `sim`'s node namespace against the agent over https: its exit code and the
/// HTTP status it printed.
fn curl(sim: &SimNode, dir: &Path, path: &str, args: &[&str]) -> (i32, String) {
    curl_over(sim, dir, "https", path, args)
}

/// curl against the agent over `scheme`: its exit code and the HTTP status it printed.
fn curl_over(sim: &SimNode, dir: &Path, scheme: &str, path: &str, args: &[&str]) -> (i32, String) {
    let out: Output = sim
        .node
        .command("curl")
        .current_dir(dir)
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(args)
        .arg(format!("{scheme}://{LISTEN}{path}"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn tls_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("em-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ca(&dir, "ca");
    ca(&dir, "other-ca");
    signed(
        &dir,
        "agent",
        "ca",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    signed(&dir, "prometheus", "ca", "extendedKeyUsage=clientAuth\n");
    signed(
        &dir,
        "stranger",
        "other-ca",
        "extendedKeyUsage=clientAuth\n",
    );
    dir
}

#[test]
fn prometheus_scrapes_over_tls_with_a_password_and_the_rest_are_refused() {
    if !require_root("prometheus_scrapes_over_tls_with_a_password_and_the_rest_are_refused") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let dir = tls_dir("scrape");
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    // Relative paths are the file's own directory's, as node_exporter has them.
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: agent.crt\n  key_file: agent.key\n  client_ca_file: ca.crt\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let web = dir.join("web.yml");
    let _agent = Running::start(&sim, &web);
    let client = [
        "--cacert",
        "ca.crt",
        "--cert",
        "prometheus.crt",
        "--key",
        "prometheus.key",
    ];
    // The kubelet's probes need no password; over TLS, like everything.
    wait_for("the agent over TLS", Duration::from_secs(20), || {
        curl(&sim, &dir, "/healthz", &client) == (0, "200".to_owned())
    });
    assert_eq!(curl(&sim, &dir, "/readyz", &client), (0, "200".to_owned()));
    let with_password = [&client[..], &["-u", "prometheus:s3cret"]].concat();
    assert_eq!(
        curl(&sim, &dir, "/metrics", &with_password),
        (0, "200".to_owned())
    );
    // No password, a wrong one, another user: 401.
    for auth in [&[][..], &["-u", "prometheus:wrong"], &["-u", "root:s3cret"]] {
        let args = [&client[..], auth].concat();
        assert_eq!(
            curl(&sim, &dir, "/metrics", &args),
            (0, "401".to_owned()),
            "{auth:?}"
        );
    }
    // A client that trusts another CA does not trust the agent (curl: 60). One without a
    // certificate, as the kubelet's probes are, gets the probes and nothing else, even
    // with the password.
    let other_ca = ["--cacert", "other-ca.crt", "-u", "prometheus:s3cret"];
    assert_eq!(curl(&sim, &dir, "/metrics", &other_ca).0, 60);
    let no_cert = ["--cacert", "ca.crt", "-u", "prometheus:s3cret"];
    assert_eq!(
        curl(&sim, &dir, "/metrics", &no_cert),
        (0, "403".to_owned())
    );
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            curl(&sim, &dir, probe, &["--insecure"]),
            (0, "200".to_owned()),
            "the kubelet's {probe}"
        );
    }
    // One with a certificate of another CA is refused in the handshake.
    let stranger = [
        "--cacert",
        "ca.crt",
        "--cert",
        "stranger.crt",
        "--key",
        "stranger.key",
        "-u",
        "prometheus:s3cret",
    ];
    let (code, status) = curl(&sim, &dir, "/metrics", &stranger);
    assert!(
        code != 0 && status == "000",
        "a stranger's certificate: curl {code}, {status}"
    );
    // Plain HTTP is not served.
    let (code, status) = curl_over(&sim, &dir, "http", "/healthz", &[]);
    assert!(
        code != 0 && status == "000",
        "plain HTTP: curl {code}, {status}"
    );

    // Debian's Prometheus, as a PodMonitor with the chart's TLS values would have it.
    let d = dir.display();
    let prometheus = Prometheus::start(
        &sim.node,
        &format!(
            "  - job_name: eni-monitor\n    scheme: https\n    tls_config:\n      ca_file: {d}/ca.crt\n      cert_file: {d}/prometheus.crt\n      key_file: {d}/prometheus.key\n    basic_auth:\n      username: prometheus\n      password: s3cret\n    static_configs:\n      - targets: ['{LISTEN}']\n"
        ),
    );
    wait_for(
        "Prometheus to scrape over TLS",
        Duration::from_mins(1),
        || {
            prometheus
                .query(&sim.node, "eni_monitor_build_info")
                .is_some_and(|v| v["data"]["result"][0]["value"][1] == "1")
        },
    );
    let up = prometheus.query(&sim.node, "up").unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The chart's probes: each `httpGet` path of the `DaemonSet`'s template.
fn chart_probe_paths() -> Vec<String> {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/helm/eni-monitor/templates/daemonset.yaml"),
    )
    .unwrap();
    template
        .lines()
        .filter_map(|l| l.split_once("httpGet: { path: "))
        .filter_map(|(_, rest)| rest.split_once(',').map(|(p, _)| p.to_owned()))
        .collect()
}

#[test]
fn every_documented_web_config_leaves_the_kubelets_probes_passing() {
    if !require_root("every_documented_web_config_leaves_the_kubelets_probes_passing") {
        return;
    }
    let probes = chart_probe_paths();
    assert_eq!(probes, ["/healthz", "/readyz"]);
    let sim = SimNode::ipv4_only();
    let dir = tls_dir("probes");
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    let tls = "tls_server_config:\n  cert_file: agent.crt\n  key_file: agent.key\n";
    let users = format!("basic_auth_users:\n  prometheus: '{hash}'\n");
    // README's configurations: TLS, with a client CA under each policy (none is
    // RequireAndVerifyClientCert), and a password, with TLS and without.
    let configs = [
        tls.to_owned(),
        format!("{tls}  client_ca_file: ca.crt\n"),
        format!("{tls}  client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n"),
        format!("{tls}  client_ca_file: ca.crt\n  client_auth_type: VerifyClientCertIfGiven\n"),
        format!("{tls}  client_ca_file: ca.crt\n  client_auth_type: NoClientCert\n"),
        format!("{tls}  client_ca_file: ca.crt\n{users}"),
        users.clone(),
    ];
    for config in configs {
        let web = dir.join("web.yml");
        std::fs::write(&web, &config).unwrap();
        let _agent = Running::start(&sim, &web);
        // As the kubelet probes: HTTPS when the chart has a web config (and TLS is in
        // it), the server's certificate not checked, no client certificate, no password.
        let https = config.contains("tls_server_config");
        let probe = |path: &str| {
            if https {
                curl(&sim, &dir, path, &["--insecure"])
            } else {
                curl_over(&sim, &dir, "http", path, &[])
            }
        };
        wait_for(
            &format!("the agent under {config}"),
            Duration::from_secs(20),
            || probe("/healthz") == (0, "200".to_owned()),
        );
        for path in &probes {
            assert_eq!(probe(path), (0, "200".to_owned()), "{path} under\n{config}");
        }
        // And /metrics still asks for what the configuration requires.
        let metrics = probe("/metrics");
        let expected = if config
            .contains("client_ca_file: ca.crt\n  client_auth_type: VerifyClientCertIfGiven")
            || config.contains("NoClientCert")
            || !config.contains("client_ca_file")
        {
            if config.contains("basic_auth_users") {
                "401"
            } else {
                "200"
            }
        } else {
            "403"
        };
        assert_eq!(
            metrics,
            (0, expected.to_owned()),
            "/metrics under\n{config}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_web_config_stops_the_agent_with_one_line() {
    if !require_root("a_bad_web_config_stops_the_agent_with_one_line") {
        return;
    }
    let sim = SimNode::ipv4_only();
    let dir = std::env::temp_dir().join(format!("em-badweb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, says) in [
        (
            "basic_auth_users:\n  prometheus: s3cret\n",
            "not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n",
            "cert_file",
        ),
        ("tls_server_config: {cert: x}\n", "unknown field `cert`"),
    ] {
        let web = dir.join("web.yml");
        std::fs::write(&web, text).unwrap();
        let out = sim
            .node
            .command(monitor_bin().to_str().unwrap())
            .args(["--listen", LISTEN, "--device", "eth0", "--web-config-file"])
            .arg(&web)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{text}: {err}");
        assert!(
            lines[0].contains("--web-config-file") && lines[0].contains(says),
            "{text}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
