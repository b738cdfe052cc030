//! NATS and Redis servers of a test's own, on ports and stores of their own, so a test can
//! kill them and start them again without touching the machine's servers.

use std::path::PathBuf;

use crate::process::{free_port, wait_until_listening};

/// A NATS server with JetStream, keeping its store in a directory of its own that outlives
/// a kill, as a restarted server keeps its streams.
pub struct OwnNats {
    port: u16,
    store: PathBuf,
    process: Option<tokio::process::Child>,
}

impl OwnNats {
    /// Starts one on a free port.
    pub async fn start() -> OwnNats {
        let mut nats = OwnNats {
            port: free_port(),
            store: std::env::temp_dir().join(format!("gb-nats-{}", ulid::Ulid::new())),
            process: None,
        };
        nats.restart().await;
        nats
    }

    /// Where clients connect.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether it runs.
    pub fn is_up(&self) -> bool {
        self.process.is_some()
    }

    /// Starts it again on the same port and store (after [`OwnNats::kill`]).
    pub async fn restart(&mut self) {
        let process = tokio::process::Command::new(nats_server())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.process = Some(process);
        wait_until_listening(self.port, "nats-server").await;
    }

    /// Kills it (`SIGKILL`).
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        if let Some(process) = self.process.as_mut() {
            let _ = process.start_kill();
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
