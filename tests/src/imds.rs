//! A stand-in for the EC2 instance metadata service (`IMDSv2`), which cannot exist here:
//! a real HTTP server on the node namespace's loopback, speaking the same protocol.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::{Background, Netns};

const TOKEN: &str = "AQAEAStandInToken==";

/// How the stand-in behaves.
#[derive(Clone)]
pub enum Behaviour {
    /// Answers for these ENIs, (MAC, ENI id, VPC CIDR), on an instance of this type.
    Serve {
        enis: Vec<(String, String, String)>,
        instance_type: &'static str,
    },
    /// Accepts connections and never answers.
    Hang,
    /// Answers every request with 500.
    Fail,
}

pub struct FakeImds {
    pub addr: SocketAddr,
    first_call: Arc<OnceLock<Instant>>,
    _server: Background,
}

impl FakeImds {
    pub fn start(ns: &Netns, behaviour: Behaviour) -> Self {
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let first_call = Arc::new(OnceLock::new());
        let called = Arc::clone(&first_call);
        let server = Background::spawn(move |stop| {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        called.get_or_init(Instant::now);
                        stream.set_nonblocking(false).unwrap();
                        match &behaviour {
                            Behaviour::Hang => held.push(stream),
                            other => answer(stream, other),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            first_call,
            _server: server,
        }
    }

    /// When the first connection to it was accepted, if one was.
    pub fn first_call(&self) -> Option<Instant> {
        self.first_call.get().copied()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn answer(stream: TcpStream, behaviour: &Behaviour) {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match behaviour {
        Behaviour::Fail => (500, String::new()),
        Behaviour::Hang => unreachable!("hanging connections are held, not answered"),
        Behaviour::Serve {
            enis,
            instance_type,
        } => {
            if method == "PUT" && path == "/latest/api/token" {
                if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() {
                    (200, TOKEN.to_owned())
                } else {
                    (400, String::new())
                }
            } else if header("x-aws-ec2-metadata-token") != Some(TOKEN) {
                (401, String::new())
            } else if path == "/latest/meta-data/instance-type" {
                (200, (*instance_type).to_owned())
            } else {
                let leaf = path.strip_prefix("/latest/meta-data/network/interfaces/macs/");
                let found = leaf.and_then(|l| {
                    let (mac, what) = l.split_once('/')?;
                    let (_, id, cidr) = enis.iter().find(|(m, _, _)| m == mac)?;
                    match what {
                        "interface-id" => Some(id.clone()),
                        "vpc-ipv4-cidr-block" => Some(cidr.clone()),
                        _ => None,
                    }
                });
                found.map_or((404, String::new()), |b| (200, b))
            }
        }
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
