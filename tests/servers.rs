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
/// empty, as a restarted Redis without persistence does; or a Redis Cluster of such servers
/// on loopback, all masters, each keeping only its cluster configuration, so that a node
/// killed and started again rejoins with its slots, empty.
pub struct OwnRedis {
    nodes: Vec<RedisNode>,
    /// Where the nodes keep their cluster configuration, when there is more than one node.
    cluster: Option<PathBuf>,
}

struct RedisNode {
    port: u16,
    bus_port: u16,
    process: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// Starts one on a free port.
    pub async fn start() -> OwnRedis {
        OwnRedis::cluster(1).await
    }

    /// Starts a Redis Cluster of `masters` servers on free ports (one plain server when
    /// `masters` is 1), the slots dealt evenly, and waits until every node reports it ok.
    pub async fn cluster(masters: usize) -> OwnRedis {
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let mut redis = OwnRedis {
            nodes: (0..masters)
                .map(|_| RedisNode {
                    port: free_port(),
                    bus_port: free_port(),
                    process: None,
                })
                .collect(),
            cluster: (masters > 1).then(|| std::env::temp_dir().join(format!("gb-redis-{id}"))),
        };
        if let Some(dir) = &redis.cluster {
            std::fs::create_dir_all(dir).unwrap();
        }
        for i in 0..masters {
            redis.start_node_first(i).await;
        }
        if redis.cluster.is_some() {
            let created = tokio::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(redis.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await
                .expect("redis-cli runs");
            assert!(created.success(), "redis-cli --cluster create failed");
            redis.wait_until_ok().await;
        }
        redis
    }

    /// Where clients connect: every node's address, separated by commas.
    pub fn url(&self) -> String {
        self.node_urls().join(",")
    }

    /// Each node's address.
    pub fn node_urls(&self) -> Vec<String> {
        (self.nodes.iter())
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    /// How many nodes it has.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The node that holds `key` (of a cluster: the one that does not answer `MOVED`).
    pub async fn node_of(&self, key: &str) -> usize {
        for (i, url) in self.node_urls().iter().enumerate() {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let found: redis::RedisResult<Option<String>> =
                redis::cmd("TYPE").arg(key).query_async(&mut conn).await;
            if found.is_ok() {
                return i;
            }
        }
        panic!("no node of {} holds {key}", self.url());
    }

    /// Starts node `i` for the first time. A port found free may be taken by another test's
    /// server before this one binds it, and then the server exits: it gets new ports and is
    /// started again (a few times at most).
    async fn start_node_first(&mut self, i: usize) {
        for _ in 0..5 {
            self.spawn(i);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let exited = (self.nodes[i].process.as_mut())
                    .is_some_and(|process| matches!(process.try_wait(), Ok(Some(_))));
                if exited {
                    self.nodes[i].process = None;
                    self.nodes[i].port = free_port();
                    self.nodes[i].bus_port = free_port();
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", self.nodes[i].port))
                    .await
                    .is_ok()
                {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        panic!("redis-server exited five times on ports found free");
    }

    /// Starts every node that is down again, empty, on its port (after [`OwnRedis::kill`]
    /// or [`OwnRedis::kill_node`]); a cluster's nodes rejoin with their slots.
    pub async fn restart(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].process.is_none() {
                self.spawn(i);
            }
        }
        for node in &self.nodes {
            wait_until_listening(node.port, "redis-server").await;
        }
    }

    /// Starts node `i` again, empty (after [`OwnRedis::kill_node`]), and waits until the
    /// cluster is ok again.
    pub async fn restart_node(&mut self, i: usize) {
        if self.nodes[i].process.is_none() {
            self.spawn(i);
        }
        wait_until_listening(self.nodes[i].port, "redis-server").await;
        if self.cluster.is_some() {
            self.wait_until_ok().await;
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", &node.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(dir) = &self.cluster {
            command
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &node.bus_port.to_string()])
                .args(["--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{}.conf", node.port)))
                .arg("--dir")
                .arg(dir);
        }
        let process = command
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        self.nodes[i].process = Some(process);
    }

    /// Waits (30 s at most) until every node of the cluster reports `cluster_state:ok`.
    async fn wait_until_ok(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        for url in self.node_urls() {
            loop {
                let info: redis::RedisResult<String> = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                }
                .await;
                if info.is_ok_and(|info| info.contains("cluster_state:ok")) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the Redis Cluster at {} never reported ok",
                    self.url()
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills every node (`SIGKILL`).
    pub async fn kill(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i).await;
        }
    }

    /// Kills node `i` (`SIGKILL`): what it held is gone.
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(mut process) = self.nodes[i].process.take() {
            process.kill().await.unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(process) = node.process.as_mut() {
                let _ = process.start_kill();
            }
        }
        if let Some(dir) = &self.cluster {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
