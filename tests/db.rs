//! One Postgres database per test.

use std::sync::Arc;

use commands::log::postgres::{PgEventLog, PgLogOptions};
use sqlx::{Connection, PgConnection};

/// The server tests create their databases on. `GROUPBUY_TEST_PG` overrides it; the default is
/// the machine's local server with trust auth.
pub fn admin_url() -> String {
    std::env::var("GROUPBUY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, migrated database that is dropped when this value is.
pub struct TestDb {
    /// The database name.
    pub name: String,
    /// A URL that connects to it.
    pub url: String,
    log: Arc<PgEventLog>,
}

impl TestDb {
    /// Creates and migrates a database with a unique name.
    pub async fn new() -> TestDb {
        Self::with_pool(8).await
    }

    /// Like [`TestDb::new`], with a larger pool for tests that hold many connections at once.
    pub async fn with_pool(pool_connections_max: u32) -> TestDb {
        crate::init_tracing();
        let name = format!("gbtest_{}", ulid::Ulid::new().to_string().to_lowercase());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("Postgres must be running for the tests ({admin}): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let url = database_url(&admin, &name);
        let options = PgLogOptions {
            pool_connections_max,
            ..PgLogOptions::default()
        };
        let log = PgEventLog::connect(&url, &options)
            .await
            .expect("connect to test database");
        log.migrate().await.expect("migrate test database");
        TestDb {
            name,
            url,
            log: Arc::new(log),
        }
    }

    /// The event log on this database.
    pub fn log(&self) -> Arc<PgEventLog> {
        Arc::clone(&self.log)
    }
}

/// `admin` with its database name replaced by `name`.
fn database_url(admin: &str, name: &str) -> String {
    let (base, query) = admin
        .split_once('?')
        .map_or((admin, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any async context we can await in, so the cleanup gets its own
        // thread and runtime. FORCE ends the connections the test's pools still hold.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&admin_url()).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("test database {} not dropped: {error}", self.name);
        }
    }
}
