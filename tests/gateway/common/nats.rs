//! A real NATS cluster for the cluster-mode tests: `nats-server` processes
//! with JetStream on loopback, routed to each other, each with its own
//! store directory; stopped (SIGKILL) when dropped.
//!
//! The binary is `nats-server` on PATH (scripts/env.sh puts the one
//! scripts/setup-system installs there) or `$NATS_SERVER`.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsNode {
    pub name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub config: PathBuf,
    pub child: Option<Child>,
}

pub struct NatsCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NatsNode>,
}

fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsCluster {
    /// `n` routed nodes with JetStream; returns once every node takes
    /// connections (the JetStream meta leader is elected after; the
    /// gateway waits for its stream).
    pub fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (client_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, c))| format!("\"nats-route://127.0.0.1:{c}\""))
                .collect();
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: onecard-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\nmax_payload: 8MB\n{cluster}",
                store.display()
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            nodes.push(NatsNode {
                name,
                client_port: *client_port,
                cluster_port: *cluster_port,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { dir, nodes };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    /// Starts node `i` (again) on its config and store.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is running", node.name);
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", node.name))).unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}); scripts/setup-system installs it and scripts/env.sh puts it on PATH"
                )
            });
        node.child = Some(child);
        wait_port(node.client_port);
    }

    /// SIGKILL to node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `nats://` URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
