//! The ledger: accounts, API keys, holds and settlements.
//!
//! [`Ledger`] is the contract every backend meets; [`MemoryLedger`] is the
//! in-process backend used by `switchyard dev` and tests. The rules every backend
//! follows:
//!
//! - A hold is a conditional reservation: it succeeds only if the account's
//!   available balance (balance minus open holds) covers it, so no balance can go
//!   below zero.
//! - Settlement and release are idempotent by consumer request id: a second call
//!   returns the first outcome and moves no money.
//! - A settlement charges at most the hold; what is left of the hold is released.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccountId, ConsumerRequestId, ModelId, NodeId};
use crate::money::MicroUsd;

/// Prefix of every consumer API key, so leaked keys are easy to recognise.
pub const API_KEY_PREFIX: &str = "sy_";
/// Prefix of every provider token.
pub const PROVIDER_TOKEN_PREFIX: &str = "sy_pt_";

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

/// What an API key resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub account_id: AccountId,
    /// The first characters of the key, safe to show and log.
    pub display_prefix: String,
}

/// A reservation placed before dispatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    pub request_id: ConsumerRequestId,
    pub account_id: AccountId,
    pub amount: MicroUsd,
    pub node_id: NodeId,
}

/// How a request ended, as recorded with its usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    ConsumerDisconnected,
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
    pub outcome: Outcome,
}

/// What a settlement did. A repeated settlement returns the first one's receipt.
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    #[error("available balance {available} USD is below the hold of {requested} USD")]
    InsufficientFunds {
        available: MicroUsd,
        requested: MicroUsd,
    },
    #[error("hold amount {0} USD is negative")]
    InvalidAmount(MicroUsd),
    #[error("no hold exists for request {0}")]
    HoldNotFound(ConsumerRequestId),
    #[error("a hold already exists for request {0}")]
    DuplicateHold(ConsumerRequestId),
    #[error("ledger backend unavailable: {0}")]
    Unavailable(String),
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldState {
    Open,
    Settled,
    Released,
}

#[derive(Debug)]
struct Hold {
    account_id: AccountId,
    amount: MicroUsd,
    state: HoldState,
    receipt: Option<SettlementReceipt>,
}

#[derive(Debug, Default)]
struct Account {
    balance: MicroUsd,
    held: MicroUsd,
    earnings: MicroUsd,
}

#[derive(Debug, Default)]
struct MemoryState {
    accounts: HashMap<AccountId, Account>,
    api_keys: HashMap<SecretHash, ApiKeyInfo>,
    provider_tokens: HashMap<SecretHash, AccountId>,
    holds: HashMap<ConsumerRequestId, Hold>,
    platform_revenue: MicroUsd,
}

/// An in-process ledger. State lives in one mutex: every operation is a few map
/// updates and never awaits while holding it.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    state: Mutex<MemoryState>,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock leaves consistent maps, because every
        // update finishes before the guard drops; recovering is safe.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates an account, or tops up an existing one, with `amount`.
    pub fn credit(&self, account: &AccountId, amount: MicroUsd) {
        let mut state = self.lock();
        let entry = state.accounts.entry(account.clone()).or_default();
        entry.balance = entry.balance + amount;
    }

    /// Issues a new API key for `account` and returns the key; only its hash is kept.
    pub fn issue_api_key(&self, account: &AccountId) -> String {
        let key = generate_secret(API_KEY_PREFIX);
        self.add_api_key(account, &key);
        key
    }

    /// Registers a caller-chosen API key for `account`.
    pub fn add_api_key(&self, account: &AccountId, key: &str) {
        let info = ApiKeyInfo {
            account_id: account.clone(),
            display_prefix: key.chars().take(10).collect(),
        };
        let mut state = self.lock();
        state.accounts.entry(account.clone()).or_default();
        state.api_keys.insert(SecretHash::of(key), info);
    }

    /// Issues a provider token whose earnings go to `account`.
    pub fn issue_provider_token(&self, account: &AccountId) -> String {
        let token = generate_secret(PROVIDER_TOKEN_PREFIX);
        let mut state = self.lock();
        state.accounts.entry(account.clone()).or_default();
        state
            .provider_tokens
            .insert(SecretHash::of(&token), account.clone());
        token
    }

    /// Total platform fees and unlinked providers' shares collected.
    pub fn platform_revenue(&self) -> MicroUsd {
        self.lock().platform_revenue
    }

    /// Number of holds that are neither settled nor released.
    pub fn open_holds(&self) -> usize {
        self.lock()
            .holds
            .values()
            .filter(|hold| hold.state == HoldState::Open)
            .count()
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn authenticate(&self, key: SecretHash) -> Result<Option<ApiKeyInfo>, LedgerError> {
        Ok(self.lock().api_keys.get(&key).cloned())
    }

    async fn provider_account(&self, token: SecretHash) -> Result<Option<AccountId>, LedgerError> {
        Ok(self.lock().provider_tokens.get(&token).cloned())
    }

    async fn place_hold(&self, hold: HoldRequest) -> Result<(), LedgerError> {
        if hold.amount < MicroUsd::ZERO {
            return Err(LedgerError::InvalidAmount(hold.amount));
        }
        let mut state = self.lock();
        if state.holds.contains_key(&hold.request_id) {
            return Err(LedgerError::DuplicateHold(hold.request_id));
        }

        let account = state
            .accounts
            .get_mut(&hold.account_id)
            .ok_or_else(|| LedgerError::AccountNotFound(hold.account_id.clone()))?;
        let available = account.balance - account.held;
        if available < hold.amount {
            return Err(LedgerError::InsufficientFunds {
                available,
                requested: hold.amount,
            });
        }
        account.held = account.held + hold.amount;

        state.holds.insert(
            hold.request_id,
            Hold {
                account_id: hold.account_id,
                amount: hold.amount,
                state: HoldState::Open,
                receipt: None,
            },
        );
        Ok(())
    }

    async fn settle(&self, settlement: Settlement) -> Result<SettlementReceipt, LedgerError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let hold = state
            .holds
            .get_mut(&settlement.request_id)
            .ok_or_else(|| LedgerError::HoldNotFound(settlement.request_id.clone()))?;

        match hold.state {
            HoldState::Settled => {
                return Ok(hold.receipt.clone().expect("a settled hold has a receipt"));
            }
            HoldState::Released => {
                return Ok(SettlementReceipt {
                    charged: MicroUsd::ZERO,
                    released: hold.amount,
                    provider_earning: MicroUsd::ZERO,
                    platform_fee: MicroUsd::ZERO,
                });
            }
            HoldState::Open => {}
        }

        let charged = settlement.cost.min(hold.amount).max(MicroUsd::ZERO);
        let consumer = state
            .accounts
            .get_mut(&hold.account_id)
            .ok_or_else(|| LedgerError::AccountNotFound(hold.account_id.clone()))?;
        consumer.held = consumer.held - hold.amount;
        consumer.balance = consumer.balance - charged;

        // An unlinked provider (or one whose account is gone) earns nothing here:
        // the whole charge is platform revenue, and the receipt says so.
        let provider = settlement
            .provider_account
            .as_ref()
            .and_then(|id| state.accounts.get_mut(id));
        let split = match provider {
            Some(provider) => {
                let split = crate::money::FeeSplit::of(charged, settlement.platform_fee_bps);
                provider.balance = provider.balance + split.provider_earning;
                provider.earnings = provider.earnings + split.provider_earning;
                split
            }
            None => crate::money::FeeSplit {
                provider_earning: MicroUsd::ZERO,
                platform_fee: charged,
            },
        };
        state.platform_revenue = state.platform_revenue + split.platform_fee;

        let receipt = SettlementReceipt {
            charged,
            released: hold.amount - charged,
            provider_earning: split.provider_earning,
            platform_fee: split.platform_fee,
        };
        hold.state = HoldState::Settled;
        hold.receipt = Some(receipt.clone());
        Ok(receipt)
    }

    async fn release(&self, request_id: &ConsumerRequestId) -> Result<(), LedgerError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let hold = state
            .holds
            .get_mut(request_id)
            .ok_or_else(|| LedgerError::HoldNotFound(request_id.clone()))?;
        if hold.state != HoldState::Open {
            return Ok(());
        }

        if let Some(account) = state.accounts.get_mut(&hold.account_id) {
            account.held = account.held - hold.amount;
        }
        hold.state = HoldState::Released;
        Ok(())
    }

    async fn balance(&self, account: &AccountId) -> Result<AccountBalance, LedgerError> {
        let state = self.lock();
        let account_state = state
            .accounts
            .get(account)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))?;
        Ok(AccountBalance {
            balance: account_state.balance,
            held: account_state.held,
        })
    }

    async fn earnings(&self, account: &AccountId) -> Result<MicroUsd, LedgerError> {
        let state = self.lock();
        state
            .accounts
            .get(account)
            .map(|entry| entry.earnings)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))
    }
}

#[cfg(test)]
mod tests;
