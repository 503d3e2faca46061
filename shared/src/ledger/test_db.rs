//! Throwaway Postgres databases for tests: each test gets its own, created from
//! the server at `SWITCHYARD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and migrated, so tests run in
//! parallel without sharing rows.

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use super::{LedgerError, PgLedger};

/// Server URL used when `SWITCHYARD_TEST_DATABASE_URL` is not set.
pub const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A migrated database of its own. Dropping it does not drop the database:
/// call [`TestDatabase::drop_database`], or leave it for inspection.
pub struct TestDatabase {
    pub name: String,
    /// URL of the new database.
    pub url: String,
    server_url: String,
}

impl TestDatabase {
    /// Creates and migrates a database named `switchyard_test_<random>`.
    pub async fn create() -> Result<Self, LedgerError> {
        let server_url = std::env::var("SWITCHYARD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_SERVER_URL.to_owned());
        let name = format!("switchyard_test_{}", uuid::Uuid::new_v4().simple());

        let mut admin = PgConnection::connect(&server_url)
            .await
            .map_err(|error| LedgerError::Unavailable(Box::new(error)))?;
        // The name is generated above from hex digits only, so it is safe to
        // splice into the statement; CREATE DATABASE takes no bind parameters.
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .map_err(|error| LedgerError::Unavailable(Box::new(error)))?;
        admin.close().await.ok();

        let url = replace_database(&server_url, &name);
        let database = Self {
            name,
            url,
            server_url,
        };
        let migrated = match database.ledger(4) {
            Ok(ledger) => ledger.migrate().await,
            Err(error) => Err(error),
        };
        if let Err(error) = migrated {
            // Leave no half-made database behind.
            let _ = database.drop_database().await;
            return Err(error);
        }
        Ok(database)
    }

    /// Opens a ledger on this database with at most `max_connections`.
    pub fn ledger(&self, max_connections: u32) -> Result<PgLedger, LedgerError> {
        PgLedger::connect_lazy(&self.url, max_connections)
    }

    /// Drops the database, ending any connection still open to it.
    pub async fn drop_database(self) -> Result<(), LedgerError> {
        let mut admin = PgConnection::connect(&self.server_url)
            .await
            .map_err(|error| LedgerError::Unavailable(Box::new(error)))?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .map_err(|error| LedgerError::Unavailable(Box::new(error)))?;
        Ok(())
    }
}

/// Returns `url` with its database path replaced by `database`.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            replace_database("postgres://u@h/db?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@h", "t1"),
            "postgres://u@h/t1"
        );
    }
}
