//! The in-process ledger.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{
    AccountBalance, ApiKeyInfo, EntryKind, HoldRequest, Ledger, LedgerError, SecretHash,
    Settlement, SettlementPlan, SettlementReceipt, UsageRecord, display_prefix,
};
use crate::catalog::ModelEntry;
use crate::ids::{AccountId, ConsumerRequestId};
use crate::money::MicroUsd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldState {
    Open,
    Settled,
    Released,
}

#[derive(Debug)]
struct Hold {
    account_id: AccountId,
    node_id: crate::ids::NodeId,
    key_prefix: String,
    amount: MicroUsd,
    state: HoldState,
    created: Instant,
    receipt: Option<SettlementReceipt>,
}

#[derive(Debug, Default)]
struct Account {
    limits: super::RateLimits,
    /// Available balance: open holds are already debited.
    available: MicroUsd,
    held: MicroUsd,
    earnings: MicroUsd,
    entries_total: MicroUsd,
}

#[derive(Debug, Default)]
struct MemoryState {
    accounts: HashMap<AccountId, Account>,
    api_keys: HashMap<SecretHash, (ApiKeyInfo, bool)>,
    provider_tokens: HashMap<SecretHash, AccountId>,
    holds: HashMap<ConsumerRequestId, Hold>,
    /// Kind and reference of every entry written, for the at-most-once rule.
    entries: std::collections::HashSet<(EntryKind, String, AccountId)>,
    usage: Vec<(AccountId, UsageRecord)>,
    platform_revenue: MicroUsd,
    models: std::collections::BTreeMap<crate::ids::ModelId, ModelEntry>,
    providers: HashMap<String, Option<AccountId>>,
}

impl MemoryState {
    /// Applies one ledger entry; false if an entry of this kind and reference
    /// already exists for the account.
    fn apply(
        &mut self,
        account: &AccountId,
        kind: EntryKind,
        reference: &str,
        amount: MicroUsd,
    ) -> bool {
        apply_entry(
            &mut self.accounts,
            &mut self.entries,
            account,
            kind,
            reference,
            amount,
        )
    }
}

/// Applies one ledger entry to the maps it touches, which lets a caller hold
/// other borrows of the state at the same time.
fn apply_entry(
    accounts: &mut HashMap<AccountId, Account>,
    entries: &mut std::collections::HashSet<(EntryKind, String, AccountId)>,
    account: &AccountId,
    kind: EntryKind,
    reference: &str,
    amount: MicroUsd,
) -> bool {
    if !entries.insert((kind, reference.to_owned(), account.clone())) {
        return false;
    }
    let entry = accounts.entry(account.clone()).or_default();
    entry.available = entry.available + amount;
    entry.entries_total = entry.entries_total + amount;
    if kind == EntryKind::Earning {
        entry.earnings = entry.earnings + amount;
    }
    true
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

    /// Platform fees and unlinked providers' shares collected so far.
    pub fn platform_revenue(&self) -> MicroUsd {
        self.lock().platform_revenue
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Every update finishes before the guard drops, so a poisoned lock still
        // holds consistent maps.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn authenticate(&self, key: SecretHash) -> Result<Option<ApiKeyInfo>, LedgerError> {
        let state = self.lock();
        Ok(state
            .api_keys
            .get(&key)
            .filter(|(_, revoked)| !revoked)
            .map(|(info, _)| ApiKeyInfo {
                limits: state
                    .accounts
                    .get(&info.account_id)
                    .map(|account| account.limits)
                    .unwrap_or_default(),
                ..info.clone()
            }))
    }

    async fn set_rate_limits(
        &self,
        account: &AccountId,
        limits: super::RateLimits,
    ) -> Result<(), LedgerError> {
        let mut state = self.lock();
        let entry = state
            .accounts
            .get_mut(account)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))?;
        entry.limits = limits;
        Ok(())
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
        if account.available < hold.amount {
            return Err(LedgerError::InsufficientFunds {
                available: account.available,
                requested: hold.amount,
            });
        }
        account.held = account.held + hold.amount;

        let reference = hold.request_id.to_string();
        state.apply(
            &hold.account_id,
            EntryKind::Hold,
            &reference,
            MicroUsd::ZERO - hold.amount,
        );
        state.holds.insert(
            hold.request_id,
            Hold {
                account_id: hold.account_id,
                node_id: hold.node_id,
                key_prefix: hold.key_prefix,
                amount: hold.amount,
                state: HoldState::Open,
                created: Instant::now(),
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
            .get(&settlement.request_id)
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

        let (consumer, amount, key_prefix) = (
            hold.account_id.clone(),
            hold.amount,
            hold.key_prefix.clone(),
        );
        let provider_exists = settlement
            .provider_account
            .as_ref()
            .is_some_and(|id| state.accounts.contains_key(id));
        let plan = SettlementPlan::new(&settlement, amount, provider_exists);
        let receipt = plan.receipt.clone();
        let reference = settlement.request_id.to_string();

        if let Some(account) = state.accounts.get_mut(&consumer) {
            account.held = account.held - amount;
        }
        state.apply(&consumer, EntryKind::Release, &reference, receipt.released);
        if let Some(provider) = &plan.provider_account {
            state.apply(
                provider,
                EntryKind::Earning,
                &reference,
                receipt.provider_earning,
            );
        }
        state.platform_revenue = state.platform_revenue + receipt.platform_fee;

        let sequence = state.usage.len() as i64 + 1;
        state.usage.push((
            consumer,
            UsageRecord {
                sequence,
                request_id: settlement.request_id.clone(),
                model: settlement.model.clone(),
                key_prefix,
                prompt_tokens: settlement.prompt_tokens,
                completion_tokens: settlement.completion_tokens,
                cost: receipt.charged,
                outcome: settlement.outcome,
                created_at_ms: now_ms(),
            },
        ));

        let hold = state
            .holds
            .get_mut(&settlement.request_id)
            .expect("the hold was found above under the same lock");
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
        hold.state = HoldState::Released;
        let (account, amount) = (hold.account_id.clone(), hold.amount);

        if let Some(entry) = state.accounts.get_mut(&account) {
            entry.held = entry.held - amount;
        }
        state.apply(&account, EntryKind::Release, request_id.as_str(), amount);
        Ok(())
    }

    async fn balance(&self, account: &AccountId) -> Result<AccountBalance, LedgerError> {
        let state = self.lock();
        let entry = state
            .accounts
            .get(account)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))?;
        Ok(AccountBalance {
            balance: entry.available + entry.held,
            held: entry.held,
        })
    }

    async fn earnings(&self, account: &AccountId) -> Result<MicroUsd, LedgerError> {
        self.lock()
            .accounts
            .get(account)
            .map(|entry| entry.earnings)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))
    }

    async fn usage(
        &self,
        account: &AccountId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let state = self.lock();
        Ok(state
            .usage
            .iter()
            .rev()
            .filter(|(owner, record)| {
                owner == account && before.is_none_or(|cursor| record.sequence < cursor)
            })
            .take(limit as usize)
            .map(|(_, record)| record.clone())
            .collect())
    }

    async fn entries_total(&self, account: &AccountId) -> Result<MicroUsd, LedgerError> {
        self.lock()
            .accounts
            .get(account)
            .map(|entry| entry.entries_total)
            .ok_or_else(|| LedgerError::AccountNotFound(account.clone()))
    }

    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64, LedgerError> {
        // One pass under the lock, so concurrent sweeps never release a hold twice.
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut released = 0;
        for (request_id, hold) in state.holds.iter_mut() {
            if hold.state != HoldState::Open || hold.created.elapsed() < older_than {
                continue;
            }
            hold.state = HoldState::Released;
            if let Some(account) = state.accounts.get_mut(&hold.account_id) {
                account.held = account.held - hold.amount;
            }
            apply_entry(
                &mut state.accounts,
                &mut state.entries,
                &hold.account_id,
                EntryKind::Release,
                request_id.as_str(),
                hold.amount,
            );
            released += 1;
        }
        Ok(released)
    }

    async fn release_orphaned_holds(
        &self,
        live_nodes: &[crate::ids::NodeId],
        older_than: Duration,
    ) -> Result<u64, LedgerError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut released = 0;
        for (request_id, hold) in state.holds.iter_mut() {
            let orphaned = hold.state == HoldState::Open
                && hold.created.elapsed() >= older_than
                && !live_nodes.contains(&hold.node_id);
            if !orphaned {
                continue;
            }
            hold.state = HoldState::Released;
            if let Some(account) = state.accounts.get_mut(&hold.account_id) {
                account.held = account.held - hold.amount;
            }
            apply_entry(
                &mut state.accounts,
                &mut state.entries,
                &hold.account_id,
                EntryKind::Release,
                request_id.as_str(),
                hold.amount,
            );
            released += 1;
        }
        Ok(released)
    }

    async fn check(&self) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn create_account(&self, account: &AccountId) -> Result<(), LedgerError> {
        self.lock().accounts.entry(account.clone()).or_default();
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
        {
            let mut state = self.lock();
            if !state.accounts.contains_key(account) {
                return Err(LedgerError::AccountNotFound(account.clone()));
            }
            state.apply(account, EntryKind::Credit, reference, amount);
        }
        self.balance(account).await
    }

    async fn add_api_key(
        &self,
        account: &AccountId,
        key: &str,
        _name: &str,
    ) -> Result<(), LedgerError> {
        let mut state = self.lock();
        if !state.accounts.contains_key(account) {
            return Err(LedgerError::AccountNotFound(account.clone()));
        }
        let info = ApiKeyInfo {
            account_id: account.clone(),
            display_prefix: display_prefix(key),
            limits: super::RateLimits::default(),
        };
        state.api_keys.insert(SecretHash::of(key), (info, false));
        Ok(())
    }

    async fn revoke_api_key(&self, prefix: &str) -> Result<SecretHash, LedgerError> {
        let mut state = self.lock();
        let found = state
            .api_keys
            .iter_mut()
            .find(|(_, (info, revoked))| info.display_prefix == prefix && !*revoked);
        match found {
            Some((hash, (_, revoked))) => {
                *revoked = true;
                Ok(*hash)
            }
            None => Err(LedgerError::KeyNotFound(prefix.to_owned())),
        }
    }

    async fn list_models(&self) -> Result<Vec<ModelEntry>, LedgerError> {
        Ok(self.lock().models.values().cloned().collect())
    }

    async fn upsert_model(&self, model: &ModelEntry) -> Result<(), LedgerError> {
        self.lock().models.insert(model.id.clone(), model.clone());
        Ok(())
    }

    async fn record_provider(
        &self,
        public_key: &str,
        account: Option<&AccountId>,
    ) -> Result<(), LedgerError> {
        self.lock()
            .providers
            .insert(public_key.to_owned(), account.cloned());
        Ok(())
    }

    async fn add_provider_token(
        &self,
        account: &AccountId,
        token: &str,
    ) -> Result<(), LedgerError> {
        let mut state = self.lock();
        if !state.accounts.contains_key(account) {
            return Err(LedgerError::AccountNotFound(account.clone()));
        }
        state
            .provider_tokens
            .insert(SecretHash::of(token), account.clone());
        Ok(())
    }
}
