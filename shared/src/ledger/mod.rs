//! The ledger: accounts, API keys, holds and settlements.
//!
//! [`Ledger`] is the contract every backend meets: [`MemoryLedger`] keeps
//! everything in the process (for `switchyard dev` without a database and for
//! tests) and [`PgLedger`] in shared Postgres. One contract test suite runs
//! against both. The rules:
//!
//! - A hold is a conditional debit: it succeeds only if the account's available
//!   balance covers it, so no balance can go below zero.
//! - Settlement and release are idempotent by consumer request id: a second call
//!   returns the first outcome and moves no money.
//! - A settlement charges at most the hold; what is left of the hold is released.
//! - Every movement of money is a ledger entry, at most one of each kind per
//!   request, so the entries of an account always add up to its available
//!   balance.

mod batch;
mod memory;
mod postgres;
pub mod test_db;

use std::time::Duration;

use async_trait::async_trait;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, ModelEntry, SharedCatalog};
use crate::ids::{AccountId, ConsumerRequestId, ModelId, NodeId};
use crate::money::MicroUsd;

/// Prefix of every consumer API key, so leaked keys are easy to recognise.
pub const API_KEY_PREFIX: &str = "sy_";
/// Prefix of every provider token.
pub const PROVIDER_TOKEN_PREFIX: &str = "sy_pt_";
/// Characters of a key kept as its display prefix, safe to show and log.
pub const KEY_PREFIX_LEN: usize = 12;

pub use memory::MemoryLedger;
pub use postgres::{MIGRATOR, PgLedger};

/// SHA-256 of a secret (API key or provider token). Only the hash is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SecretHash(#[serde(with = "hex_bytes")] [u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

/// The display prefix of a key or token.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(KEY_PREFIX_LEN).collect()
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

/// Generates a secret: `prefix` followed by 32 random bytes in hex.
pub fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// The account and display prefix an API key resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub account_id: AccountId,
    /// The first characters of the key, safe to show and log.
    pub display_prefix: String,
    /// The account's own rate limits; `None` means the router's default.
    pub limits: RateLimits,
}

/// Per-account rate limits. `None` means the router's default; zero means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// A reservation placed before dispatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    pub request_id: ConsumerRequestId,
    pub account_id: AccountId,
    /// Display prefix of the API key the request came with.
    pub key_prefix: String,
    pub amount: MicroUsd,
    pub node_id: NodeId,
}

/// The way a request ended, recorded with its usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    ConsumerDisconnected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ConsumerDisconnected => "consumer_disconnected",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "completed" => Some(Outcome::Completed),
            "consumer_disconnected" => Some(Outcome::ConsumerDisconnected),
            _ => None,
        }
    }
}

/// Kinds of ledger entries. Each happens at most once per reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Debit of a consumer's hold before dispatch.
    Hold,
    /// Return of the unused part of a hold (all of it when nothing is charged).
    Release,
    /// Credit of a provider's earning.
    Earning,
    /// Money added by an operator.
    Credit,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Hold => "hold",
            EntryKind::Release => "release",
            EntryKind::Earning => "earning",
            EntryKind::Credit => "credit",
        }
    }
}

/// The money movements of one settlement, shared by every backend so that they
/// compute the same amounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SettlementPlan {
    pub receipt: SettlementReceipt,
    /// Account credited with `receipt.provider_earning`, when there is one.
    pub provider_account: Option<AccountId>,
}

impl SettlementPlan {
    /// Plans a settlement of `settlement` against a hold of `hold`.
    /// `provider_exists` is whether the provider's account exists.
    pub fn new(settlement: &Settlement, hold: MicroUsd, provider_exists: bool) -> Self {
        let charged = settlement.cost.min(hold).max(MicroUsd::ZERO);
        let provider_account = settlement
            .provider_account
            .clone()
            .filter(|_| provider_exists);
        let split = match provider_account {
            Some(_) => crate::money::FeeSplit::of(charged, settlement.platform_fee_bps),
            // An unlinked provider earns nothing here: the whole charge is
            // platform revenue, and the receipt says so.
            None => crate::money::FeeSplit {
                provider_earning: MicroUsd::ZERO,
                platform_fee: charged,
            },
        };
        Self {
            receipt: SettlementReceipt {
                charged,
                released: hold - charged,
                provider_earning: split.provider_earning,
                platform_fee: split.platform_fee,
            },
            provider_account,
        }
    }
}

/// The final charge of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: ConsumerRequestId,
    pub model: ModelId,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Cost before capping at the hold.
    pub cost: MicroUsd,
    /// Fee in basis points of the charged cost.
    pub platform_fee_bps: u32,
    /// Account credited with the provider's earning; unlinked providers earn nothing
    /// here and the whole charge is recorded as platform revenue.
    pub provider_account: Option<AccountId>,
    /// The provider's X25519 public key, its identity across reconnects.
    pub provider_key: String,
    pub node_id: NodeId,
    pub outcome: Outcome,
}

/// One settled request, as its account's history shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    /// Position in the history; pass it as `before` to get the next page.
    pub sequence: i64,
    pub request_id: ConsumerRequestId,
    pub model: ModelId,
    pub key_prefix: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(rename = "cost_micro_usd")]
    pub cost: MicroUsd,
    pub outcome: Outcome,
    /// Unix time in milliseconds.
    pub created_at_ms: i64,
}

/// A newly issued API key or provider token. The secret is shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IssuedSecret {
    pub secret: String,
    pub display_prefix: String,
}

/// The amounts a settlement moved. A repeated settlement returns the first receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementReceipt {
    pub charged: MicroUsd,
    pub released: MicroUsd,
    pub provider_earning: MicroUsd,
    pub platform_fee: MicroUsd,
}

/// A balance as reported to its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AccountBalance {
    /// Money in the account, open holds included.
    pub balance: MicroUsd,
    /// Part of the balance reserved by open holds.
    pub held: MicroUsd,
}

impl AccountBalance {
    pub fn available(&self) -> MicroUsd {
        self.balance - self.held
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    #[error("available balance {available} USD is below the hold of {requested} USD")]
    InsufficientFunds {
        available: MicroUsd,
        requested: MicroUsd,
    },
    #[error("amount {0} USD must not be negative")]
    InvalidAmount(MicroUsd),
    #[error("no hold exists for request {0}")]
    HoldNotFound(ConsumerRequestId),
    #[error("a hold already exists for request {0}")]
    DuplicateHold(ConsumerRequestId),
    #[error("no API key with prefix {0}")]
    KeyNotFound(String),
    #[error("ledger backend unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("ledger migration failed")]
    Migration(#[source] sqlx::migrate::MigrateError),
    #[error(
        "ledger schema is version {found}, this build expects {expected}; run `switchyard migrate`"
    )]
    SchemaMismatch { found: i64, expected: i64 },
}

impl PartialEq for LedgerError {
    fn eq(&self, other: &Self) -> bool {
        use LedgerError::*;
        match (self, other) {
            (AccountNotFound(a), AccountNotFound(b)) => a == b,
            (
                InsufficientFunds {
                    available: a,
                    requested: b,
                },
                InsufficientFunds {
                    available: c,
                    requested: d,
                },
            ) => a == c && b == d,
            (InvalidAmount(a), InvalidAmount(b)) => a == b,
            (HoldNotFound(a), HoldNotFound(b)) => a == b,
            (DuplicateHold(a), DuplicateHold(b)) => a == b,
            (KeyNotFound(a), KeyNotFound(b)) => a == b,
            (Unavailable(_), Unavailable(_)) | (Migration(_), Migration(_)) => true,
            (
                SchemaMismatch {
                    found: a,
                    expected: b,
                },
                SchemaMismatch {
                    found: c,
                    expected: d,
                },
            ) => a == c && b == d,
            _ => false,
        }
    }
}

/// The ledger contract shared by every backend.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Resolves an API key by its hash; revoked and unknown keys give `None`.
    async fn authenticate(&self, key: SecretHash) -> Result<Option<ApiKeyInfo>, LedgerError>;

    /// Resolves a provider token to the account its earnings go to.
    async fn provider_account(&self, token: SecretHash) -> Result<Option<AccountId>, LedgerError>;

    /// Reserves `amount` of the account's available balance for one request.
    async fn place_hold(&self, hold: HoldRequest) -> Result<(), LedgerError>;

    /// Charges a held request, credits the provider, records the fee and releases
    /// the rest of the hold. Idempotent by request id.
    async fn settle(&self, settlement: Settlement) -> Result<SettlementReceipt, LedgerError>;

    /// Releases the whole hold of a request that will not be charged. Releasing a
    /// settled or already released request changes nothing.
    async fn release(&self, request_id: &ConsumerRequestId) -> Result<(), LedgerError>;

    async fn balance(&self, account: &AccountId) -> Result<AccountBalance, LedgerError>;

    /// Total earnings credited to a provider account.
    async fn earnings(&self, account: &AccountId) -> Result<MicroUsd, LedgerError>;

    /// Returns an account's settled requests, newest first, at most `limit`, with
    /// a sequence below `before` when it is given.
    async fn usage(
        &self,
        account: &AccountId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<UsageRecord>, LedgerError>;

    /// Sum of an account's ledger entries; always equal to its available balance.
    async fn entries_total(&self, account: &AccountId) -> Result<MicroUsd, LedgerError>;

    /// Releases holds left open longer than `older_than`, as a node that died
    /// leaves them. Returns how many were released. A settled hold is never
    /// released.
    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64, LedgerError>;

    /// Releases holds placed by nodes not in `live_nodes` that are older than
    /// `older_than`: their node died before settling them. Returns how many were
    /// released. A settled hold is never released.
    async fn release_orphaned_holds(
        &self,
        live_nodes: &[NodeId],
        older_than: Duration,
    ) -> Result<u64, LedgerError>;

    /// Checks that the backend is reachable.
    async fn check(&self) -> Result<(), LedgerError>;

    /// Creates an account with a zero balance; an existing account is unchanged.
    async fn create_account(&self, account: &AccountId) -> Result<(), LedgerError>;

    /// Adds `amount` to an account, once per `reference`: a repeated credit with the
    /// same reference changes nothing. Returns the new balance.
    async fn credit(
        &self,
        account: &AccountId,
        amount: MicroUsd,
        reference: &str,
    ) -> Result<AccountBalance, LedgerError>;

    /// Sets an account's rate limits.
    async fn set_rate_limits(
        &self,
        account: &AccountId,
        limits: RateLimits,
    ) -> Result<(), LedgerError>;

    /// Returns the model table, enabled and disabled models alike; empty when it
    /// was never seeded.
    async fn list_models(&self) -> Result<Vec<ModelEntry>, LedgerError>;

    /// Inserts or replaces one model, prices included.
    async fn upsert_model(&self, model: &ModelEntry) -> Result<(), LedgerError>;

    /// Records that a provider with this X25519 key registered, and the account
    /// its token linked it to.
    async fn record_provider(
        &self,
        public_key: &str,
        account: Option<&AccountId>,
    ) -> Result<(), LedgerError>;

    /// Stores the hash of an API key for an account.
    async fn add_api_key(
        &self,
        account: &AccountId,
        key: &str,
        name: &str,
    ) -> Result<(), LedgerError>;

    /// Revokes the API key with this display prefix; returns its hash so caches
    /// can drop it.
    async fn revoke_api_key(&self, display_prefix: &str) -> Result<SecretHash, LedgerError>;

    /// Stores the hash of a provider token whose earnings go to `account`.
    async fn add_provider_token(&self, account: &AccountId, token: &str)
    -> Result<(), LedgerError>;

    /// Issues a new API key for an account; only its hash is stored.
    async fn issue_api_key(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<IssuedSecret, LedgerError> {
        let key = generate_secret(API_KEY_PREFIX);
        self.add_api_key(account, &key, name).await?;
        Ok(IssuedSecret {
            display_prefix: display_prefix(&key),
            secret: key,
        })
    }

    /// Issues a new provider token for an account; only its hash is stored.
    async fn issue_provider_token(&self, account: &AccountId) -> Result<IssuedSecret, LedgerError> {
        let token = generate_secret(PROVIDER_TOKEN_PREFIX);
        self.add_provider_token(account, &token).await?;
        Ok(IssuedSecret {
            display_prefix: display_prefix(&token),
            secret: token,
        })
    }
}

/// Seeds the ledger's model table from `seed` if it is empty, then loads the
/// table into `catalog`. The platform fee stays the seed's.
pub async fn sync_catalog(
    ledger: &dyn Ledger,
    seed: &Catalog,
    catalog: &SharedCatalog,
) -> Result<(), LedgerError> {
    let mut models = ledger.list_models().await?;
    if models.is_empty() {
        for entry in seed.entries() {
            ledger.upsert_model(entry).await?;
        }
        models = ledger.list_models().await?;
    }
    match Catalog::from_entries(models, seed.platform_fee_bps()) {
        Ok(loaded) => {
            catalog.replace(loaded);
            Ok(())
        }
        Err(error) => Err(LedgerError::Unavailable(Box::new(error))),
    }
}

/// Reloads the catalog from the ledger every `interval` until `shutdown`. A
/// failed reload keeps the current catalog; the failure is logged once, and the
/// recovery again.
pub fn spawn_catalog_refresh(
    ledger: std::sync::Arc<dyn Ledger>,
    seed: Catalog,
    catalog: std::sync::Arc<SharedCatalog>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match sync_catalog(ledger.as_ref(), &seed, &catalog).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("model catalog reloads from the ledger again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(error = %error, "failed to reload the model catalog; keeping the current one");
                }
                Err(_) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests;
