//! A real NATS JetStream cluster for cluster mode's tests (SPEC §13, issue 15): three
//! `nats-server` processes on loopback ports, each with its own store dir and
//! `jetstream { sync_interval: always }` (every write synced before it is acknowledged).
//!
//! The server binary: `$BURSAR_NATS_SERVER`, else the pinned one that
//! `scripts/install-nats-server.sh` installs (run here when it is missing), else a
//! `nats-server` ≥ 2.10 on the `PATH`. Where none can be had, [`NatsCluster::start`] returns
//! `Err` with the reason and the test says it skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server version `scripts/install-nats-server.sh` pins.
pub const PINNED_VERSION: &str = "2.15.1";

/// Find (or install) a `nats-server` that has `sync_interval` (2.10 or newer).
pub fn nats_server() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BURSAR_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/install-nats-server.sh");
    let installed = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if installed.status.success() {
        let path = String::from_utf8_lossy(&installed.stdout)
            .trim()
            .to_string();
        if let Some(last) = path.lines().last() {
            return Ok(PathBuf::from(last));
        }
    }
    let why = String::from_utf8_lossy(&installed.stderr)
        .trim()
        .to_string();
    // A current server on the PATH will do.
    if let Ok(out) = Command::new("nats-server").arg("--version").output() {
        let v = String::from_utf8_lossy(&out.stdout);
        if let Some((major, minor)) = v.trim().strip_prefix("nats-server: v").and_then(|v| {
            let mut it = v.split('.');
            Some((
                it.next()?.parse::<u32>().ok()?,
                it.next()?.parse::<u32>().ok()?,
            ))
        }) {
            if (major, minor) >= (2, 10) {
                return Ok(PathBuf::from("nats-server"));
            }
        }
    }
    Err(format!(
        "no nats-server >= 2.10 (scripts/install-nats-server.sh: {why})"
    ))
}

/// A free loopback port below the kernel's ephemeral range when one is found: a server killed
/// and started again on its port must not find it taken as the source port of a connection
/// some client opened meanwhile (the daemons reconnect many times in the fault rounds).
fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_from > 12_000 {
        for _ in 0..200 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let span = u64::from(ephemeral_from - 10_000);
            let p = 10_000 + (h.finish() % span) as u16;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return p;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One node of the cluster.
pub struct NatsNode {
    /// `n1`, `n2`, ...
    pub name: String,
    /// Client port.
    pub port: u16,
    /// Cluster (route) port.
    pub cluster_port: u16,
    /// Monitoring (HTTP) port.
    pub http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether its process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Three (or n) `nats-server`s clustered on loopback; killed when dropped.
pub struct NatsCluster {
    /// Its nodes.
    pub nodes: Vec<NatsNode>,
    bin: PathBuf,
    /// Holds every node's config, store dir and log.
    pub dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Start `n` clustered servers with JetStream (`sync_interval: always`) and wait until
    /// JetStream has a meta leader (a stream can be created).
    pub fn start(n: usize) -> Result<NatsCluster, String> {
        // A port found free may be taken before the server binds it (another test's outgoing
        // connection gets it as its ephemeral port): the cluster is then made again on other
        // ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match NatsCluster::start_once(n) {
                Err(e) if attempt < 3 && e.contains("address already in use") => {
                    eprintln!("a NATS port was taken meanwhile; starting the cluster again");
                }
                other => return other,
            }
        }
    }

    fn start_once(n: usize) -> Result<NatsCluster, String> {
        let bin = nats_server()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut taken = std::collections::HashSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (port(), port(), port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c, _)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, cluster_port, http_port)) in ports.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(format!("{name}-store"));
            let config = dir.path().join(format!("{name}.conf"));
            let log = dir.path().join(format!("{name}.log"));
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
                 jetstream {{ store_dir: {store:?}, sync_interval: always }}\n\
                 cluster {{ name: bursar-test, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                routes.join(", ")
            );
            std::fs::write(&config, text).map_err(|e| e.to_string())?;
            nodes.push(NatsNode {
                name,
                port,
                cluster_port,
                http_port,
                config,
                log,
                child: None,
            });
        }
        let mut cluster = NatsCluster { nodes, bin, dir };
        for i in 0..n {
            cluster.start_node(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Start (or restart) node `i` on its ports and store.
    pub fn start_node(&mut self, i: usize) -> Result<(), String> {
        let bin = self.bin.clone();
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// kill -9 node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every running node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.url())
            .collect()
    }

    /// A node's monitoring endpoint `path` (`/jsz?streams=true`, ...), as text.
    pub fn http_get(&self, i: usize, path: &str) -> Result<String, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].http_port))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }

    /// The node (index) that leads stream `stream`, per the running nodes' `/jsz`, asked for
    /// up to 10 s (the servers' monitoring learns of a new leader a moment after the stream
    /// has one); `None` when none names one by then.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let asked = Instant::now();
        loop {
            let leader = self.stream_leader_now(stream);
            if leader.is_some() || asked.elapsed() > Duration::from_secs(10) {
                return leader;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stream_leader_now(&self, stream: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            for s in self.stream_details(i) {
                // A node that does not know the leader yet: ask the next one.
                if let Some(leader) = s["cluster"]["leader"]
                    .as_str()
                    .filter(|_| s["name"] == stream)
                {
                    return self.nodes.iter().position(|n| n.name == leader);
                }
            }
        }
        None
    }

    /// Every stream node `i` knows of, as its `/jsz?streams=true` details it (none when the
    /// node is not running or does not answer).
    fn stream_details(&self, i: usize) -> Vec<serde_json::Value> {
        if !self.nodes[i].is_running() {
            return Vec::new();
        }
        let Some(v) = self
            .http_get(i, "/jsz?streams=true")
            .ok()
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        else {
            return Vec::new();
        };
        v["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Wait until every stream has a leader that reports each of the stream's other replicas
    /// current (caught up with it). Only the leader's own view says so: the others report each
    /// other as not current. A node restarted after a kill catches up a moment after the
    /// cluster has a meta leader again ([`NatsCluster::wait_ready`]).
    pub fn wait_streams_current(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let mut streams = std::collections::BTreeSet::new();
            let mut current = std::collections::BTreeSet::new();
            for (i, n) in self.nodes.iter().enumerate() {
                for st in self.stream_details(i) {
                    let Some(name) = st["name"].as_str() else {
                        continue;
                    };
                    streams.insert(name.to_string());
                    let cluster = &st["cluster"];
                    let led_here = cluster["leader"].as_str() == Some(n.name.as_str());
                    let replicas = cluster["replicas"].as_array();
                    if led_here && replicas.is_some_and(|r| r.iter().all(|x| x["current"] == true))
                    {
                        current.insert(name.to_string());
                    }
                }
            }
            if streams == current {
                return Ok(());
            }
            if Instant::now() > deadline {
                let behind: Vec<&String> = streams.difference(&current).collect();
                return Err(format!(
                    "streams without a leader with every replica current after {within:?}: {behind:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether every running node's `/routez` has its whole pool of routes (`/varz`
    /// `cluster.pool_size`, each account's traffic on one of them) to every other running node.
    /// A server that has routes but does not name their peers (`remote_name`) is taken as
    /// meshed.
    fn routes_meshed(&self) -> bool {
        let json = |i: usize, path: &str| {
            self.http_get(i, path)
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        };
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_running())
            .collect();
        running.iter().all(|&i| {
            let (Some(routez), Some(varz)) = (json(i, "/routez"), json(i, "/varz")) else {
                return false;
            };
            let pool = varz["cluster"]["pool_size"].as_u64().unwrap_or(1).max(1) as usize;
            let routes = routez["routes"].as_array().cloned().unwrap_or_default();
            let to = |name: &str| {
                routes
                    .iter()
                    .filter(|x| x["remote_name"].as_str() == Some(name))
                    .count()
            };
            let unnamed =
                !routes.is_empty() && routes.iter().all(|x| x.get("remote_name").is_none());
            unnamed
                || running
                    .iter()
                    .filter(|&&j| j != i)
                    .all(|&j| to(&self.nodes[j].name) >= pool)
        })
    }

    /// Wait until every running node reports a JetStream meta leader and has routes to every
    /// other running node (a server restarted a moment ago may have a route to one peer only:
    /// a kill of that peer then leaves its clients with no way to the streams).
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            // A server that exited (a port taken, a bad config) is reported at once.
            for n in &mut self.nodes {
                if let Some(status) = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    n.child = None;
                    return Err(format!(
                        "nats-server {} exited ({status}):\n{}",
                        n.name,
                        std::fs::read_to_string(&n.log).unwrap_or_default()
                    ));
                }
            }
            let ready = self.nodes.iter().enumerate().all(|(i, n)| {
                !n.is_running()
                    || self
                        .http_get(i, "/jsz")
                        .ok()
                        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                        .is_some_and(|v| v["meta_cluster"]["leader"].as_str().is_some())
            });
            if ready && self.routes_meshed() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| std::fs::read_to_string(&n.log).unwrap_or_default())
                    .collect();
                return Err(format!(
                    "the NATS cluster has no JetStream leader, or not every route, after {within:?}:\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // A test that failed shows what the servers said (the end of each node's log).
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "--- nats-server {} (last {} lines)\n{}",
                    n.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
