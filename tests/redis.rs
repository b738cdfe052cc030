//! Redis key prefixes per test, and reading a read model's keys back.

use std::collections::BTreeMap;

use ::redis::aio::ConnectionManager;
use ::redis::AsyncCommands;
use projections::{ProjectionName, ProjectionStore, RedisProjections, VersionStatus};

/// The Redis server tests use. `GROUPBUY_TEST_REDIS` overrides it; the default is the
/// machine's local server.
pub fn redis_url() -> String {
    std::env::var("GROUPBUY_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test uses; its keys are deleted when this value is dropped.
pub struct TestRedis {
    /// The server.
    pub url: String,
    /// The prefix.
    pub prefix: String,
}

impl TestRedis {
    /// A fresh prefix on the machine's Redis.
    pub fn new() -> TestRedis {
        crate::init_tracing();
        TestRedis {
            url: redis_url(),
            prefix: format!("t{}", ulid::Ulid::new().to_string().to_lowercase()),
        }
    }

    /// A fresh prefix on the Redis (or the Redis Cluster, its nodes separated by commas) at
    /// `url`. Only a single server's keys are deleted on drop: a cluster of a test's own goes
    /// with the test.
    pub fn on(url: &str) -> TestRedis {
        let mut redis = TestRedis::new();
        redis.url = url.to_owned();
        redis
    }

    /// A store on this prefix.
    pub async fn connect(&self) -> RedisProjections {
        RedisProjections::connect(&self.url, &self.prefix)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Redis at {} (is it running?): {e}", self.url))
    }

    /// A plain connection.
    pub async fn connection(&self) -> ConnectionManager {
        let client = ::redis::Client::open(self.url.as_str()).unwrap();
        ConnectionManager::new(client).await.unwrap()
    }

    /// Deletes every key of this prefix, as a flushed Redis would have none.
    pub async fn flush(&self) {
        let mut conn = self.connection().await;
        delete_prefix(&mut conn, &self.prefix).await;
    }

    /// Every key of the live version of `name`, relative to the version's root, with its
    /// content in a canonical text form: two read models are identical exactly when their
    /// dumps are equal.
    pub async fn dump(&self, name: ProjectionName) -> BTreeMap<String, String> {
        let store = self.connect().await;
        let live = store
            .versions()
            .await
            .unwrap()
            .into_iter()
            .find(|v| v.name == name && v.status == VersionStatus::Live)
            .expect("a live version");
        let root = format!("{}:", store.root(name, live.version));
        let mut conn = self.connection().await;
        let keys = scan(&mut conn, &format!("{root}*")).await;
        let mut dump = BTreeMap::new();
        for key in keys {
            let kind: String = ::redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let content = match kind.as_str() {
                "string" => conn.get::<_, String>(&key).await.unwrap(),
                "hash" => {
                    let map: BTreeMap<String, String> = conn.hgetall(&key).await.unwrap();
                    format!("{map:?}")
                }
                "zset" => {
                    let members: Vec<String> = conn.zrange(&key, 0, -1).await.unwrap();
                    format!("{members:?}")
                }
                other => panic!("unexpected {other} at {key}"),
            };
            let relative = key.strip_prefix(&root).unwrap().to_owned();
            if relative == "meta" {
                continue;
            }
            dump.insert(relative, content);
        }
        dump
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(found);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

async fn delete_prefix(conn: &mut ConnectionManager, prefix: &str) {
    for chunk in scan(conn, &format!("{prefix}:*")).await.chunks(1000) {
        let _: u64 = ::redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(conn)
            .await
            .unwrap();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // Its own thread and runtime: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(client) = ::redis::Client::open(url.as_str()) {
                    if let Ok(mut conn) = ConnectionManager::new(client).await {
                        delete_prefix(&mut conn, &prefix).await;
                    }
                }
            });
        })
        .join();
    }
}
