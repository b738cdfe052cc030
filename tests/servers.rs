//! NATS and Redis servers of a test's own, on ports and stores of their own, so a test can
//! kill them and start them again without touching the machine's servers.

use std::path::PathBuf;

use crate::process::{free_port, wait_until_listening};

/// A NATS server with JetStream, or a cluster of them on loopback, each node keeping its store
/// in a directory of its own that outlives a kill, as a restarted server keeps its streams.
pub struct OwnNats {
    nodes: Vec<NatsNode>,
    /// The cluster's name, when there is more than one node.
    cluster: Option<String>,
    store: PathBuf,
}

struct NatsNode {
    port: u16,
    cluster_port: u16,
    process: Option<tokio::process::Child>,
}

impl OwnNats {
    /// Starts one server on a free port.
    pub async fn start() -> OwnNats {
        OwnNats::cluster(1).await
    }

    /// Starts a JetStream cluster of `nodes` servers on free ports (one server when `nodes`
    /// is 1), and waits until it has elected the leader that JetStream requests need.
    pub async fn cluster(nodes: usize) -> OwnNats {
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let mut nats = OwnNats {
            nodes: (0..nodes)
                .map(|_| NatsNode {
                    port: free_port(),
                    cluster_port: free_port(),
                    process: None,
                })
                .collect(),
            cluster: (nodes > 1).then(|| format!("gb-{id}")),
            store: std::env::temp_dir().join(format!("gb-nats-{id}")),
        };
        nats.restart().await;
        nats
    }

    /// Where clients connect: every node's address, separated by commas.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many nodes it has.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Whether every node runs.
    pub fn is_up(&self) -> bool {
        self.nodes.iter().all(|node| node.process.is_some())
    }

    /// Starts every node that is down again, on its port and store (after
    /// [`OwnNats::kill`] or [`OwnNats::kill_node`]), and waits until JetStream answers.
    pub async fn restart(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].process.is_none() {
                self.spawn(i);
            }
        }
        for node in &self.nodes {
            wait_until_listening(node.port, "nats-server").await;
        }
        self.wait_for_jetstream().await;
    }

    /// Starts node `i` again (after [`OwnNats::kill_node`]), and waits until it listens.
    pub async fn restart_node(&mut self, i: usize) {
        if self.nodes[i].process.is_none() {
            self.spawn(i);
        }
        wait_until_listening(self.nodes[i].port, "nats-server").await;
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let mut command = tokio::process::Command::new(nats_server());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &node.port.to_string()])
            .arg("-sd")
            .arg(self.store.join(format!("node{i}")));
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = (self.nodes.iter().enumerate())
                .filter(|&(j, _)| j != i)
                .map(|(_, other)| format!("nats://127.0.0.1:{}", other.cluster_port))
                .collect();
            command
                .args(["-n", &format!("{cluster}-{i}"), "--cluster_name", cluster])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", node.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let process = command
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.nodes[i].process = Some(process);
    }

    /// Waits (30 s at most) until a JetStream request succeeds: a cluster answers only once
    /// its nodes have found each other and elected a leader.
    async fn wait_for_jetstream(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let answer = match async_nats::ConnectOptions::new()
                .connection_timeout(std::time::Duration::from_secs(1))
                .connect(self.url().split(',').collect::<Vec<_>>())
                .await
            {
                // The raw request: this client's account-info type does not read a 2.9
                // server's answer.
                Ok(client) => match client.request("$JS.API.INFO", "".into()).await {
                    Ok(reply) => {
                        let info: serde_json::Value =
                            serde_json::from_slice(&reply.payload).unwrap_or_default();
                        match info.get("error") {
                            None if info.is_object() => Ok(()),
                            _ => Err(info.to_string()),
                        }
                    }
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            };
            let Err(error) = answer else { return };
            assert!(
                tokio::time::Instant::now() < deadline,
                "JetStream on {} never answered: {error}",
                self.url()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Kills every node (`SIGKILL`).
    pub async fn kill(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i).await;
        }
    }

    /// Kills node `i` (`SIGKILL`).
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(mut process) = self.nodes[i].process.take() {
            process.kill().await.unwrap();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(process) = node.process.as_mut() {
                let _ = process.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn nats_server() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("nats-server is installed (scripts/services installs it)")
}

/// A Redis server keeping nothing on disk, so that one killed and started again comes back
/// empty, as a restarted Redis without persistence does.
pub struct OwnRedis {
    port: u16,
    process: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// Starts one on a free port.
    pub async fn start() -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            process: None,
        };
        redis.restart().await;
        redis
    }

    /// Where clients connect.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again, empty, on the same port (after [`OwnRedis::kill`]).
    pub async fn restart(&mut self) {
        let process = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        self.process = Some(process);
        wait_until_listening(self.port, "redis-server").await;
    }

    /// Kills it (`SIGKILL`).
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }
}
