//! The ledger in shared Postgres.
//!
//! Holds, settlements and releases are the SQL functions of the
//! `ledger_functions` migration. Holds and settlements go through a batcher
//! (`batch`): whatever is waiting is sent in one call, one round trip and one
//! transaction for the whole batch. They
//! lock the hold row (`FOR UPDATE`) first, so two nodes settling the same request
//! serialize on it and the second sees the first one's result. Other writes of
//! several rows run in one transaction through [`PgLedger::transaction`]. Balance rules are enforced by the
//! schema as well: `CHECK (balance_micro_usd >= 0)` and the uniqueness of
//! (account, kind, reference) in `ledger_entries`.
//!
//! Postgres errors are classified by SQLSTATE: connection-level failures become
//! [`LedgerError::Unavailable`], which callers turn into 503s.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tracing::warn;

use super::batch::Batcher;
use super::{
    AccountBalance, ApiKeyInfo, EntryKind, HoldRequest, Ledger, LedgerError, SecretHash,
    Settlement, SettlementReceipt, UsageRecord, display_prefix,
};
use crate::catalog::ModelEntry;
use crate::ids::{AccountId, ConsumerRequestId, ModelId};
use crate::money::MicroUsd;

/// The migrations embedded in this build from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Advisory lock key held by the node that sweeps stale holds ("SWEEPER" in ASCII).
const SWEEPER_LOCK_KEY: i64 = 0x0053_5745_4550_4552;

/// Maximum number of holds or settlements sent in one call.
const MAX_BATCH: usize = 64;
/// Batches of each kind running at once, each on its own connection.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// A ledger backed by a Postgres connection pool.
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
    holds: Arc<OnceLock<Batcher<HoldRequest, ()>>>,
    settlements: Arc<OnceLock<Batcher<Settlement, SettlementReceipt>>>,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl PgLedger {
    /// Connects to `url` with at most `max_connections`. Connecting is lazy: the
    /// pool opens connections on first use, so a role can start while Postgres is
    /// down and recover when it returns.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|error: sqlx::Error| LedgerError::Unavailable(Box::new(error)))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            holds: Arc::new(OnceLock::new()),
            settlements: Arc::new(OnceLock::new()),
        }
    }

    /// The hold batcher, started on first use (inside the runtime).
    fn hold_batcher(&self) -> &Batcher<HoldRequest, ()> {
        self.holds.get_or_init(|| {
            let pool = self.pool.clone();
            Batcher::spawn(MAX_BATCH, MAX_BATCHES_IN_FLIGHT, move |holds| {
                place_holds(pool.clone(), holds)
            })
        })
    }

    /// The settlement batcher, started on first use (inside the runtime).
    fn settlement_batcher(&self) -> &Batcher<Settlement, SettlementReceipt> {
        self.settlements.get_or_init(|| {
            let pool = self.pool.clone();
            Batcher::spawn(MAX_BATCH, MAX_BATCHES_IN_FLIGHT, move |settlements| {
                settle_all(pool.clone(), settlements)
            })
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), LedgerError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(LedgerError::Migration)
    }

    /// Fails unless the database has exactly the migrations embedded in this build.
    pub async fn check_schema(&self) -> Result<(), LedgerError> {
        let expected = MIGRATOR
            .iter()
            .map(|migration| migration.version)
            .max()
            .unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .or_else(|error| match &error {
                    // No migrations table: nothing was ever applied.
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                    _ => Err(error),
                })
                .map_err(classify)?;

        let found = applied.unwrap_or(0);
        if found != expected {
            return Err(LedgerError::SchemaMismatch { found, expected });
        }
        Ok(())
    }

    /// Releases a hold; returns whether this call released it (false when it was
    /// already settled or released).
    async fn release_hold(&self, request_id: &ConsumerRequestId) -> Result<bool, LedgerError> {
        let outcome: String = sqlx::query_scalar("SELECT switchyard_release_hold($1)")
            .bind(request_id.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        match outcome.as_str() {
            "not_found" => Err(LedgerError::HoldNotFound(request_id.clone())),
            "released" => Ok(true),
            _ => Ok(false),
        }
    }

    /// Runs `body` in one transaction, committing if it returns `Ok`.
    async fn transaction<T, F>(&self, body: F) -> Result<T, LedgerError>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, Postgres>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, LedgerError>> + Send + 't>,
        >,
        T: Send,
    {
        let mut transaction = self.pool.begin().await.map_err(classify)?;
        let value = body(&mut transaction).await?;
        transaction.commit().await.map_err(classify)?;
        Ok(value)
    }
}

/// Maps a driver error to a ledger error. Connection failures, pool timeouts and
/// server shutdown are `Unavailable`; so is anything unexpected, since the caller
/// can only retry.
fn classify(error: sqlx::Error) -> LedgerError {
    LedgerError::Unavailable(Box::new(error))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Adds `amount` to an account's available balance and writes the matching
/// ledger entry. `held_change` moves the held column in the same update.
async fn apply_entry(
    transaction: &mut Transaction<'static, Postgres>,
    account: &AccountId,
    kind: EntryKind,
    reference: &str,
    amount: MicroUsd,
    held_change: MicroUsd,
) -> Result<(), sqlx::Error> {
    let earning = if kind == EntryKind::Earning {
        amount.get()
    } else {
        0
    };
    sqlx::query(
        "WITH updated AS (
             UPDATE accounts
             SET balance_micro_usd = balance_micro_usd + $4,
                 held_micro_usd = held_micro_usd + $5,
                 earnings_micro_usd = earnings_micro_usd + $6
             WHERE id = $1
             RETURNING balance_micro_usd
         )
         INSERT INTO ledger_entries (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
         SELECT $1, $2, $3, $4, balance_micro_usd FROM updated",
    )
    .bind(account.as_str())
    .bind(kind.as_str())
    .bind(reference)
    .bind(amount.get())
    .bind(held_change.get())
    .bind(earning)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Places a batch of holds with one call of `switchyard_place_hold_batch`.
async fn place_holds(
    pool: PgPool,
    holds: Vec<HoldRequest>,
) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
    let rows = sqlx::query(
        "SELECT item, outcome, available FROM switchyard_place_hold_batch($1, $2, $3, $4, $5) ORDER BY item",
    )
    .bind(holds.iter().map(|hold| hold.request_id.as_str()).collect::<Vec<_>>())
    .bind(holds.iter().map(|hold| hold.account_id.as_str()).collect::<Vec<_>>())
    .bind(holds.iter().map(|hold| hold.key_prefix.as_str()).collect::<Vec<_>>())
    .bind(holds.iter().map(|hold| hold.amount.get()).collect::<Vec<_>>())
    .bind(holds.iter().map(|hold| hold.node_id.as_str()).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await
    .map_err(|error| {
        warn!(error = %error, holds = holds.len(), "placing a batch of holds failed");
        classify(error)
    })?;

    Ok(holds
        .into_iter()
        .zip(rows)
        .map(|(hold, row)| match row.get::<&str, _>("outcome") {
            "ok" => Ok(()),
            "duplicate" => Err(LedgerError::DuplicateHold(hold.request_id)),
            "no_account" => Err(LedgerError::AccountNotFound(hold.account_id)),
            _ => Err(LedgerError::InsufficientFunds {
                available: MicroUsd::new(row.get::<Option<i64>, _>("available").unwrap_or(0)),
                requested: hold.amount,
            }),
        })
        .collect())
}

/// Settles a batch with one call of `switchyard_settle_batch`.
async fn settle_all(
    pool: PgPool,
    settlements: Vec<Settlement>,
) -> Result<Vec<Result<SettlementReceipt, LedgerError>>, LedgerError> {
    let rows = sqlx::query(
        "SELECT item, outcome, hold_amount, charged, provider_earning, platform_fee
         FROM switchyard_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ORDER BY item",
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.request_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.cost.get())
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| i32::try_from(item.platform_fee_bps).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.provider_account.as_ref().map(AccountId::as_str))
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.provider_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.node_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.model.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| to_i64(item.prompt_tokens))
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| to_i64(item.completion_tokens))
            .collect::<Vec<_>>(),
    )
    .bind(
        settlements
            .iter()
            .map(|item| item.outcome.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&pool)
    .await
    .map_err(|error| {
        warn!(error = %error, settlements = settlements.len(), "settling a batch failed");
        classify(error)
    })?;

    Ok(settlements
        .into_iter()
        .zip(rows)
        .map(|(settlement, row)| {
            if row.get::<&str, _>("outcome") == "not_found" {
                return Err(LedgerError::HoldNotFound(settlement.request_id));
            }
            let amount =
                |column: &str| MicroUsd::new(row.get::<Option<i64>, _>(column).unwrap_or(0));
            let charged = amount("charged");
            Ok(SettlementReceipt {
                charged,
                released: amount("hold_amount") - charged,
                provider_earning: amount("provider_earning"),
                platform_fee: amount("platform_fee"),
            })
        })
        .collect())
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl Ledger for PgLedger {
    async fn authenticate(&self, key: SecretHash) -> Result<Option<ApiKeyInfo>, LedgerError> {
        let row = sqlx::query(
            "SELECT k.account_id, k.display_prefix, a.requests_per_minute, a.tokens_per_minute
             FROM api_keys k JOIN accounts a ON a.id = k.account_id
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(key.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;

        let limit = |row: &sqlx::postgres::PgRow, column: &str| {
            row.get::<Option<i32>, _>(column)
                .and_then(|value| u32::try_from(value).ok())
        };
        Ok(row.map(|row| ApiKeyInfo {
            account_id: AccountId::new(row.get::<String, _>("account_id")),
            display_prefix: row.get("display_prefix"),
            limits: super::RateLimits {
                requests_per_minute: limit(&row, "requests_per_minute"),
                tokens_per_minute: limit(&row, "tokens_per_minute"),
            },
        }))
    }

    async fn set_rate_limits(
        &self,
        account: &AccountId,
        limits: super::RateLimits,
    ) -> Result<(), LedgerError> {
        let to_column =
            |value: Option<u32>| value.map(|limit| i32::try_from(limit).unwrap_or(i32::MAX));
        let updated = sqlx::query(
            "UPDATE accounts SET requests_per_minute = $2, tokens_per_minute = $3 WHERE id = $1",
        )
        .bind(account.as_str())
        .bind(to_column(limits.requests_per_minute))
        .bind(to_column(limits.tokens_per_minute))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        if updated.rows_affected() == 0 {
            return Err(LedgerError::AccountNotFound(account.clone()));
        }
        Ok(())
    }

    async fn provider_account(&self, token: SecretHash) -> Result<Option<AccountId>, LedgerError> {
        let account: Option<String> = sqlx::query_scalar(
            "SELECT account_id FROM provider_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(token.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(account.map(AccountId::new))
    }

    async fn place_hold(&self, hold: HoldRequest) -> Result<(), LedgerError> {
        if hold.amount < MicroUsd::ZERO {
            return Err(LedgerError::InvalidAmount(hold.amount));
        }
        self.hold_batcher().submit(hold).await
    }

    async fn settle(&self, settlement: Settlement) -> Result<SettlementReceipt, LedgerError> {
        self.settlement_batcher().submit(settlement).await
    }

    async fn release(&self, request_id: &ConsumerRequestId) -> Result<(), LedgerError> {
        self.release_hold(request_id).await.map(|_| ())
    }

    async fn balance(&self, account: &AccountId) -> Result<AccountBalance, LedgerError> {
        let row =
            sqlx::query("SELECT balance_micro_usd, held_micro_usd FROM accounts WHERE id = $1")
                .bind(account.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?
                .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))?;
        let available = MicroUsd::new(row.get("balance_micro_usd"));
        let held = MicroUsd::new(row.get("held_micro_usd"));
        Ok(AccountBalance {
            balance: available + held,
            held,
        })
    }

    async fn earnings(&self, account: &AccountId) -> Result<MicroUsd, LedgerError> {
        let earnings: Option<i64> =
            sqlx::query_scalar("SELECT earnings_micro_usd FROM accounts WHERE id = $1")
                .bind(account.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        earnings
            .map(MicroUsd::new)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))
    }

    async fn usage(
        &self,
        account: &AccountId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT sequence, request_id, model_id, key_prefix, prompt_tokens, completion_tokens,
                    cost_micro_usd, outcome,
                    (extract(epoch FROM created_at) * 1000)::BIGINT AS created_at_ms
             FROM usage
             WHERE account_id = $1 AND sequence < $2
             ORDER BY sequence DESC
             LIMIT $3",
        )
        .bind(account.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;

        Ok(rows
            .into_iter()
            .map(|row| UsageRecord {
                sequence: row.get("sequence"),
                request_id: ConsumerRequestId::new(row.get::<String, _>("request_id")),
                model: ModelId::new(row.get::<String, _>("model_id")),
                key_prefix: row.get("key_prefix"),
                prompt_tokens: to_u64(row.get("prompt_tokens")),
                completion_tokens: to_u64(row.get("completion_tokens")),
                cost: MicroUsd::new(row.get("cost_micro_usd")),
                outcome: super::Outcome::parse(row.get::<&str, _>("outcome"))
                    .unwrap_or(super::Outcome::Completed),
                created_at_ms: row.get("created_at_ms"),
            })
            .collect())
    }

    async fn entries_total(&self, account: &AccountId) -> Result<MicroUsd, LedgerError> {
        let total: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT (SELECT sum(amount_micro_usd)::BIGINT FROM ledger_entries WHERE account_id = $1)
             FROM accounts WHERE id = $1",
        )
        .bind(account.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        match total {
            Some(sum) => Ok(MicroUsd::new(sum.unwrap_or(0))),
            None => Err(LedgerError::AccountNotFound(account.clone())),
        }
    }

    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64, LedgerError> {
        // One sweeper at a time: the transaction-scoped advisory lock is taken
        // without waiting, and released when the transaction ends.
        let mut transaction = self.pool.begin().await.map_err(classify)?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(SWEEPER_LOCK_KEY)
            .fetch_one(&mut *transaction)
            .await
            .map_err(classify)?;
        if !locked {
            return Ok(0);
        }

        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT request_id FROM holds
             WHERE state = 'open' AND created_at < now() - make_interval(secs => $1)
             ORDER BY created_at
             LIMIT 1000",
        )
        .bind(older_than.as_secs_f64())
        .fetch_all(&mut *transaction)
        .await
        .map_err(classify)?;

        let mut released = 0;
        for request_id in stale {
            // Each release locks its hold and rechecks the state, so a hold settled
            // meanwhile is left alone and not counted.
            if self
                .release_hold(&ConsumerRequestId::new(request_id))
                .await?
            {
                released += 1;
            }
        }
        transaction.commit().await.map_err(classify)?;
        Ok(released)
    }

    async fn release_orphaned_holds(
        &self,
        live_nodes: &[crate::ids::NodeId],
        older_than: Duration,
    ) -> Result<u64, LedgerError> {
        let live: Vec<&str> = live_nodes.iter().map(crate::ids::NodeId::as_str).collect();
        let orphaned: Vec<String> = sqlx::query_scalar(
            "SELECT request_id FROM holds
             WHERE state = 'open' AND node_id <> ALL($1)
               AND created_at < now() - make_interval(secs => $2)
             ORDER BY created_at
             LIMIT 1000",
        )
        .bind(&live)
        .bind(older_than.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;

        let mut released = 0;
        for request_id in orphaned {
            if self
                .release_hold(&ConsumerRequestId::new(request_id))
                .await?
            {
                released += 1;
            }
        }
        Ok(released)
    }

    async fn check(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn create_account(&self, account: &AccountId) -> Result<(), LedgerError> {
        sqlx::query("INSERT INTO accounts (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(account.as_str())
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn credit(
        &self,
        account: &AccountId,
        amount: MicroUsd,
        reference: &str,
    ) -> Result<AccountBalance, LedgerError> {
        if amount < MicroUsd::ZERO {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let (account_id, reference_owned) = (account.clone(), reference.to_owned());
        let applied = self
            .transaction(move |transaction| {
                Box::pin(async move {
                    let exists: Option<i32> =
                        sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
                            .bind(account_id.as_str())
                            .fetch_optional(&mut **transaction)
                            .await
                            .map_err(classify)?;
                    if exists.is_none() {
                        return Err(LedgerError::AccountNotFound(account_id.clone()));
                    }
                    match apply_entry(
                        transaction,
                        &account_id,
                        EntryKind::Credit,
                        &reference_owned,
                        amount,
                        MicroUsd::ZERO,
                    )
                    .await
                    {
                        Ok(()) => Ok(true),
                        Err(error) if is_unique_violation(&error) => Ok(false),
                        Err(error) => Err(classify(error)),
                    }
                })
            })
            .await;
        match applied {
            Ok(_) => {}
            // A credit with this reference exists, so the first one is kept.
            Err(LedgerError::Unavailable(source))
                if source
                    .downcast_ref::<sqlx::Error>()
                    .is_some_and(is_unique_violation) => {}
            Err(error) => return Err(error),
        }
        self.balance(account).await
    }

    async fn add_api_key(
        &self,
        account: &AccountId,
        key: &str,
        name: &str,
    ) -> Result<(), LedgerError> {
        let inserted = sqlx::query(
            "INSERT INTO api_keys (key_hash, account_id, display_prefix, name)
             SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $2)
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(SecretHash::of(key).as_bytes().as_slice())
        .bind(account.as_str())
        .bind(display_prefix(key))
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        if inserted.rows_affected() == 0 && self.authenticate(SecretHash::of(key)).await?.is_none()
        {
            return Err(LedgerError::AccountNotFound(account.clone()));
        }
        Ok(())
    }

    async fn revoke_api_key(&self, prefix: &str) -> Result<SecretHash, LedgerError> {
        let hash: Option<Vec<u8>> = sqlx::query_scalar(
            "UPDATE api_keys SET revoked_at = now()
             WHERE key_hash = (SELECT key_hash FROM api_keys
                               WHERE display_prefix = $1 AND revoked_at IS NULL
                               ORDER BY created_at LIMIT 1)
             RETURNING key_hash",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        hash.as_deref()
            .and_then(SecretHash::from_bytes)
            .ok_or_else(|| LedgerError::KeyNotFound(prefix.to_owned()))
    }

    async fn list_models(&self) -> Result<Vec<ModelEntry>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, input_per_mtok, output_per_mtok, min_charge, default_max_tokens, replicas, enabled, weight_hash
             FROM models ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| ModelEntry {
                id: ModelId::new(row.get::<String, _>("id")),
                input_per_mtok: row.get("input_per_mtok"),
                output_per_mtok: row.get("output_per_mtok"),
                min_charge: row.get("min_charge"),
                default_max_tokens: u32::try_from(row.get::<i32, _>("default_max_tokens"))
                    .unwrap_or(1),
                replicas: u32::try_from(row.get::<i32, _>("replicas")).unwrap_or(1),
                enabled: row.get("enabled"),
                weight_hash: row.get("weight_hash"),
            })
            .collect())
    }

    async fn upsert_model(&self, model: &ModelEntry) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO models (id, input_per_mtok, output_per_mtok, min_charge, default_max_tokens, replicas, enabled, weight_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET
                 input_per_mtok = EXCLUDED.input_per_mtok,
                 output_per_mtok = EXCLUDED.output_per_mtok,
                 min_charge = EXCLUDED.min_charge,
                 default_max_tokens = EXCLUDED.default_max_tokens,
                 replicas = EXCLUDED.replicas,
                 enabled = EXCLUDED.enabled,
                 weight_hash = EXCLUDED.weight_hash,
                 updated_at = now()",
        )
        .bind(model.id.as_str())
        .bind(model.input_per_mtok)
        .bind(model.output_per_mtok)
        .bind(model.min_charge)
        .bind(i32::try_from(model.default_max_tokens).unwrap_or(i32::MAX))
        .bind(i32::try_from(model.replicas).unwrap_or(i32::MAX))
        .bind(model.enabled)
        .bind(model.weight_hash.as_deref())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn record_provider(
        &self,
        public_key: &str,
        account: Option<&AccountId>,
    ) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO providers (public_key, account_id)
             VALUES ($1, (SELECT id FROM accounts WHERE id = $2))
             ON CONFLICT (public_key) DO UPDATE SET account_id = EXCLUDED.account_id, last_seen_at = now()",
        )
        .bind(public_key)
        .bind(account.map(AccountId::as_str))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn add_provider_token(
        &self,
        account: &AccountId,
        token: &str,
    ) -> Result<(), LedgerError> {
        let inserted = sqlx::query(
            "INSERT INTO provider_tokens (token_hash, account_id, display_prefix)
             SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $2)
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(SecretHash::of(token).as_bytes().as_slice())
        .bind(account.as_str())
        .bind(display_prefix(token))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        if inserted.rows_affected() == 0
            && self
                .provider_account(SecretHash::of(token))
                .await?
                .is_none()
        {
            return Err(LedgerError::AccountNotFound(account.clone()));
        }
        Ok(())
    }
}
