//! Contract tests of [`Ledger`]. Each check runs twice, against a
//! [`MemoryLedger`] and against a [`PgLedger`] on a throwaway database from
//! [`TestDatabase`], so both backends are held to the same rules. The tests in
//! `postgres_only` cover what only the Postgres backend has: the schema check,
//! the constraints of the schema itself and the sweeper lock.
//!
//! The Postgres tests need a server at `SWITCHYARD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and fail without one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::test_db::TestDatabase;
use super::*;

/// Platform fee of every settlement in these tests, in basis points (5 %).
const FEE_BPS: u32 = 500;

/// Connections of each Postgres ledger. The sweeper keeps one connection for
/// its advisory lock while it releases holds through others, so this must be at
/// least 2.
const POOL_SIZE: u32 = 8;

/// Display prefix of the API key that every test hold comes with.
const KEY_PREFIX: &str = "sy_0123abcd4";

/// Runs `check` against a new, empty in-process ledger.
async fn run_on_memory<F, Fut>(check: F)
where
    F: FnOnce(Arc<dyn Ledger>) -> Fut,
    Fut: Future<Output = ()>,
{
    check(Arc::new(MemoryLedger::new())).await;
}

/// Runs `check` against a Postgres ledger on a new, migrated database.
async fn run_on_postgres<F, Fut>(check: F)
where
    F: FnOnce(Arc<dyn Ledger>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_on_database(|ledger| check(Arc::new(ledger))).await;
}

/// Creates a migrated throwaway database, runs `check` with a ledger on it and
/// drops the database, also when `check` panics.
async fn run_on_database<F, Fut>(check: F)
where
    F: FnOnce(PgLedger) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let database = TestDatabase::create()
        .await
        .expect("test database is created and migrated");
    let ledger = database
        .ledger(POOL_SIZE)
        .expect("test database URL is valid");

    // The check runs in its own task, so a failed assertion comes back here as
    // a join error instead of skipping the cleanup.
    let outcome = tokio::spawn(check(ledger)).await;
    database
        .drop_database()
        .await
        .expect("test database is dropped");

    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(error) => panic!("check task did not finish: {error}"),
        }
    }
}

/// Expands `contract_test!(check)` into a module with a `memory` and a
/// `postgres` test, each calling `check(&dyn Ledger)` on its backend.
/// `contract_test!(check, concurrent)` passes an `Arc<dyn Ledger>` instead, for
/// checks that spawn tasks, and runs on a multi-threaded runtime so that the
/// tasks run in parallel.
macro_rules! contract_test {
    ($check:ident) => {
        mod $check {
            #[tokio::test]
            async fn memory() {
                super::run_on_memory(|ledger| async move { super::$check(ledger.as_ref()).await })
                    .await;
            }

            #[tokio::test]
            async fn postgres() {
                super::run_on_postgres(
                    |ledger| async move { super::$check(ledger.as_ref()).await },
                )
                .await;
            }
        }
    };
    ($check:ident, concurrent) => {
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                super::run_on_memory(super::$check).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::run_on_postgres(super::$check).await;
            }
        }
    };
}

fn consumer() -> AccountId {
    AccountId::new("consumer-1")
}

fn provider() -> AccountId {
    AccountId::new("provider-owner-1")
}

fn request(id: &str) -> ConsumerRequestId {
    ConsumerRequestId::new(id)
}

fn micro(amount: i64) -> MicroUsd {
    MicroUsd::new(amount)
}

fn hold_of(id: &str, account: &AccountId, amount: i64) -> HoldRequest {
    HoldRequest {
        request_id: request(id),
        account_id: account.clone(),
        key_prefix: KEY_PREFIX.to_owned(),
        amount: micro(amount),
        node_id: NodeId::new("coordinator-0"),
    }
}

fn settlement_of(id: &str, cost: i64, provider_account: Option<AccountId>) -> Settlement {
    Settlement {
        request_id: request(id),
        model: ModelId::new("qwen3-8b-4bit"),
        prompt_tokens: 1_200,
        completion_tokens: 300,
        cost: micro(cost),
        platform_fee_bps: FEE_BPS,
        provider_account,
        provider_key: "provider-x25519-public-key".to_owned(),
        node_id: NodeId::new("coordinator-0"),
        outcome: Outcome::Completed,
    }
}

/// Creates the consumer account with `consumer_balance` micro-USD and an empty
/// provider account.
async fn open_accounts(ledger: &dyn Ledger, consumer_balance: i64) {
    ledger
        .create_account(&consumer())
        .await
        .expect("consumer account is created");
    ledger
        .credit(&consumer(), micro(consumer_balance), "opening-deposit")
        .await
        .expect("consumer account exists");
    ledger
        .create_account(&provider())
        .await
        .expect("provider account is created");
}

/// Places a hold of `amount` on the consumer account.
async fn place(ledger: &dyn Ledger, id: &str, amount: i64) {
    ledger
        .place_hold(hold_of(id, &consumer(), amount))
        .await
        .unwrap_or_else(|error| panic!("hold {id} of {amount} failed: {error}"));
}

/// Settles request `id` at `cost`, with the provider account linked.
async fn settle(ledger: &dyn Ledger, id: &str, cost: i64) -> SettlementReceipt {
    ledger
        .settle(settlement_of(id, cost, Some(provider())))
        .await
        .unwrap_or_else(|error| panic!("settlement of {id} failed: {error}"))
}

async fn balance_of(ledger: &dyn Ledger, account: &AccountId) -> AccountBalance {
    ledger
        .balance(account)
        .await
        .unwrap_or_else(|error| panic!("balance of {account} failed: {error}"))
}

async fn earnings_of(ledger: &dyn Ledger, account: &AccountId) -> MicroUsd {
    ledger
        .earnings(account)
        .await
        .unwrap_or_else(|error| panic!("earnings of {account} failed: {error}"))
}

async fn entries_total_of(ledger: &dyn Ledger, account: &AccountId) -> MicroUsd {
    ledger
        .entries_total(account)
        .await
        .unwrap_or_else(|error| panic!("entries total of {account} failed: {error}"))
}

async fn usage_of(ledger: &dyn Ledger, account: &AccountId) -> Vec<UsageRecord> {
    ledger
        .usage(account, 100, None)
        .await
        .unwrap_or_else(|error| panic!("usage of {account} failed: {error}"))
}

/// Asserts that the ledger entries of `account` add up to its available balance.
async fn assert_entries_match(ledger: &dyn Ledger, account: &AccountId) {
    let available = balance_of(ledger, account).await.available();
    let total = entries_total_of(ledger, account).await;
    assert_eq!(
        total, available,
        "ledger entries of {account} do not add up to its available balance"
    );
}

contract_test!(hold_reserves_available);
async fn hold_reserves_available(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;

    place(ledger, "r1", 400).await;

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, micro(400));
    assert_eq!(balance.available(), micro(600));
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(600));

    // A hold of exactly the available balance still fits.
    place(ledger, "r2", 600).await;

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, micro(1_000));
    assert_eq!(balance.available(), MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, MicroUsd::ZERO);
}

contract_test!(hold_over_available_rejected);
async fn hold_over_available_rejected(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;
    place(ledger, "r1", 700).await;

    let result = ledger.place_hold(hold_of("r2", &consumer(), 400)).await;

    assert_eq!(
        result,
        Err(LedgerError::InsufficientFunds {
            available: micro(300),
            requested: micro(400),
        })
    );
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, micro(700));
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(300));

    // The rejected hold was not recorded.
    assert_eq!(
        ledger.release(&request("r2")).await,
        Err(LedgerError::HoldNotFound(request("r2")))
    );
}

contract_test!(hold_on_unknown_account);
async fn hold_on_unknown_account(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;
    let stranger = AccountId::new("nobody");

    let result = ledger.place_hold(hold_of("r1", &stranger, 1)).await;

    assert_eq!(result, Err(LedgerError::AccountNotFound(stranger.clone())));
    assert_eq!(
        ledger.balance(&stranger).await,
        Err(LedgerError::AccountNotFound(stranger))
    );
    assert_eq!(
        ledger.release(&request("r1")).await,
        Err(LedgerError::HoldNotFound(request("r1")))
    );
}

contract_test!(negative_hold_rejected);
async fn negative_hold_rejected(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;

    let result = ledger.place_hold(hold_of("r1", &consumer(), -1)).await;

    assert_eq!(result, Err(LedgerError::InvalidAmount(micro(-1))));
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(1_000));
    assert_eq!(
        ledger.release(&request("r1")).await,
        Err(LedgerError::HoldNotFound(request("r1")))
    );
}

contract_test!(duplicate_hold_rejected);
async fn duplicate_hold_rejected(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;
    place(ledger, "r1", 100).await;

    // While the first hold is open.
    let while_open = ledger.place_hold(hold_of("r1", &consumer(), 200)).await;

    assert_eq!(while_open, Err(LedgerError::DuplicateHold(request("r1"))));
    assert_eq!(balance_of(ledger, &consumer()).await.held, micro(100));
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(900));

    // After it is settled.
    settle(ledger, "r1", 50).await;
    let after_settle = ledger.place_hold(hold_of("r1", &consumer(), 100)).await;

    assert_eq!(after_settle, Err(LedgerError::DuplicateHold(request("r1"))));
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(950));
    assert_eq!(balance.held, MicroUsd::ZERO);

    // After it is released.
    place(ledger, "r2", 100).await;
    ledger
        .release(&request("r2"))
        .await
        .expect("hold r2 exists");
    let after_release = ledger.place_hold(hold_of("r2", &consumer(), 100)).await;

    assert_eq!(
        after_release,
        Err(LedgerError::DuplicateHold(request("r2")))
    );
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(950));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_entries_match(ledger, &consumer()).await;
}

contract_test!(settle_charges_and_pays_provider);
async fn settle_charges_and_pays_provider(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 5_000).await;

    let receipt = settle(ledger, "r1", 1_001).await;

    // 5 % of 1001 is 50.05, rounded down to 50, so the provider earns the other 951.
    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: micro(1_001),
            released: micro(3_999),
            provider_earning: micro(951),
            platform_fee: micro(50),
        }
    );

    let consumer_balance = balance_of(ledger, &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(8_999));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(8_999));

    let provider_balance = balance_of(ledger, &provider()).await;
    assert_eq!(provider_balance.balance, micro(951));
    assert_eq!(provider_balance.held, MicroUsd::ZERO);
    assert_eq!(earnings_of(ledger, &provider()).await, micro(951));
    assert_eq!(entries_total_of(ledger, &provider()).await, micro(951));

    let usage = usage_of(ledger, &consumer()).await;
    assert_eq!(usage.len(), 1, "usage: {usage:?}");
    let record = &usage[0];
    assert_eq!(record.request_id, request("r1"));
    assert_eq!(record.model, ModelId::new("qwen3-8b-4bit"));
    assert_eq!(record.key_prefix, KEY_PREFIX);
    assert_eq!(record.prompt_tokens, 1_200);
    assert_eq!(record.completion_tokens, 300);
    assert_eq!(record.cost, micro(1_001));
    assert_eq!(record.outcome, Outcome::Completed);
    assert!(
        record.created_at_ms > 0,
        "created_at_ms is {}",
        record.created_at_ms
    );

    // Usage is recorded for the consumer, so the provider account has none.
    assert_eq!(usage_of(ledger, &provider()).await, Vec::new());
}

contract_test!(settle_caps_charge_at_hold);
async fn settle_caps_charge_at_hold(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 1_000).await;

    let receipt = settle(ledger, "r1", 2_500).await;

    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: micro(1_000),
            released: MicroUsd::ZERO,
            provider_earning: micro(950),
            platform_fee: micro(50),
        }
    );
    let consumer_balance = balance_of(ledger, &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(9_000));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);
    assert_eq!(earnings_of(ledger, &provider()).await, micro(950));
    assert_eq!(balance_of(ledger, &provider()).await.balance, micro(950));

    let usage = usage_of(ledger, &consumer()).await;
    assert_eq!(usage.len(), 1, "usage: {usage:?}");
    assert_eq!(usage[0].cost, micro(1_000));

    assert_entries_match(ledger, &consumer()).await;
    assert_entries_match(ledger, &provider()).await;
}

contract_test!(settle_unlinked_provider);
async fn settle_unlinked_provider(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 5_000).await;

    let receipt = ledger
        .settle(settlement_of("r1", 1_001, None))
        .await
        .expect("hold r1 exists");

    // With no linked account the whole charge is platform revenue.
    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: micro(1_001),
            released: micro(3_999),
            provider_earning: MicroUsd::ZERO,
            platform_fee: micro(1_001),
        }
    );
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(8_999));
    assert_eq!(
        balance_of(ledger, &provider()).await.balance,
        MicroUsd::ZERO
    );
    assert_eq!(earnings_of(ledger, &provider()).await, MicroUsd::ZERO);
    assert_entries_match(ledger, &consumer()).await;
    assert_entries_match(ledger, &provider()).await;
}

contract_test!(settle_unknown_provider_unlinked);
async fn settle_unknown_provider_unlinked(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 5_000).await;
    let ghost = AccountId::new("no-such-provider");

    let receipt = ledger
        .settle(settlement_of("r1", 1_001, Some(ghost.clone())))
        .await
        .expect("hold r1 exists");

    // A provider account that does not exist is treated as unlinked.
    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: micro(1_001),
            released: micro(3_999),
            provider_earning: MicroUsd::ZERO,
            platform_fee: micro(1_001),
        }
    );
    assert_eq!(
        ledger.balance(&ghost).await,
        Err(LedgerError::AccountNotFound(ghost.clone()))
    );
    assert_eq!(
        ledger.earnings(&ghost).await,
        Err(LedgerError::AccountNotFound(ghost))
    );
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(8_999));
    assert_eq!(earnings_of(ledger, &provider()).await, MicroUsd::ZERO);

    let usage = usage_of(ledger, &consumer()).await;
    assert_eq!(usage.len(), 1, "usage: {usage:?}");
    assert_eq!(usage[0].cost, micro(1_001));
    assert_entries_match(ledger, &consumer()).await;
}

contract_test!(settle_twice_charges_once);
async fn settle_twice_charges_once(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 5_000).await;

    let first = settle(ledger, "r1", 1_001).await;
    // A retried settlement with a different cost still returns the first receipt.
    let second = settle(ledger, "r1", 4_000).await;

    assert_eq!(second, first);
    assert_eq!(first.charged, micro(1_001));
    let consumer_balance = balance_of(ledger, &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(8_999));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(8_999));
    assert_eq!(earnings_of(ledger, &provider()).await, micro(951));
    assert_eq!(entries_total_of(ledger, &provider()).await, micro(951));

    let usage = usage_of(ledger, &consumer()).await;
    assert_eq!(usage.len(), 1, "usage: {usage:?}");
    assert_eq!(usage[0].cost, micro(1_001));
}

contract_test!(concurrent_settle_charges_once, concurrent);
async fn concurrent_settle_charges_once(ledger: Arc<dyn Ledger>) {
    open_accounts(ledger.as_ref(), 10_000).await;
    place(ledger.as_ref(), "r1", 5_000).await;

    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let ledger = Arc::clone(&ledger);
        tasks.spawn(async move { settle(ledger.as_ref(), "r1", 1_001).await });
    }

    let expected = SettlementReceipt {
        charged: micro(1_001),
        released: micro(3_999),
        provider_earning: micro(951),
        platform_fee: micro(50),
    };
    let mut settled = 0;
    while let Some(joined) = tasks.join_next().await {
        let receipt = joined.expect("settlement task did not panic");
        assert_eq!(receipt, expected);
        settled += 1;
    }
    assert_eq!(settled, 8);

    let consumer_balance = balance_of(ledger.as_ref(), &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(8_999));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);
    assert_eq!(
        entries_total_of(ledger.as_ref(), &consumer()).await,
        micro(8_999)
    );
    assert_eq!(earnings_of(ledger.as_ref(), &provider()).await, micro(951));
    assert_eq!(
        entries_total_of(ledger.as_ref(), &provider()).await,
        micro(951)
    );
    assert_eq!(usage_of(ledger.as_ref(), &consumer()).await.len(), 1);
}

contract_test!(release_returns_whole_hold);
async fn release_returns_whole_hold(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 3_000).await;

    ledger
        .release(&request("r1"))
        .await
        .expect("hold r1 exists");

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(10_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(10_000));

    // Releasing again is a no-op.
    ledger
        .release(&request("r1"))
        .await
        .expect("hold r1 exists");

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(10_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(10_000));
    assert_eq!(usage_of(ledger, &consumer()).await, Vec::new());
}

contract_test!(settle_after_release_charges_nothing);
async fn settle_after_release_charges_nothing(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 3_000).await;
    ledger
        .release(&request("r1"))
        .await
        .expect("hold r1 exists");

    let receipt = settle(ledger, "r1", 1_001).await;

    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: MicroUsd::ZERO,
            released: micro(3_000),
            provider_earning: MicroUsd::ZERO,
            platform_fee: MicroUsd::ZERO,
        }
    );
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(10_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(
        balance_of(ledger, &provider()).await.balance,
        MicroUsd::ZERO
    );
    assert_eq!(earnings_of(ledger, &provider()).await, MicroUsd::ZERO);
    assert_eq!(usage_of(ledger, &consumer()).await, Vec::new());
    assert_entries_match(ledger, &consumer()).await;
    assert_entries_match(ledger, &provider()).await;
}

contract_test!(release_after_settle_changes_nothing);
async fn release_after_settle_changes_nothing(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 5_000).await;
    let receipt = settle(ledger, "r1", 1_001).await;

    ledger
        .release(&request("r1"))
        .await
        .expect("hold r1 exists");

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(8_999));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(earnings_of(ledger, &provider()).await, micro(951));
    assert_entries_match(ledger, &consumer()).await;
    assert_entries_match(ledger, &provider()).await;

    // The settlement is still the recorded outcome.
    let repeated = settle(ledger, "r1", 1_001).await;
    assert_eq!(repeated, receipt);
}

contract_test!(unknown_request_not_found);
async fn unknown_request_not_found(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;

    assert_eq!(
        ledger
            .settle(settlement_of("missing", 100, Some(provider())))
            .await,
        Err(LedgerError::HoldNotFound(request("missing")))
    );
    assert_eq!(
        ledger.release(&request("missing")).await,
        Err(LedgerError::HoldNotFound(request("missing")))
    );
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(10_000));
    assert_eq!(earnings_of(ledger, &provider()).await, MicroUsd::ZERO);
}

contract_test!(concurrent_holds_never_overdraw, concurrent);
async fn concurrent_holds_never_overdraw(ledger: Arc<dyn Ledger>) {
    open_accounts(ledger.as_ref(), 95).await;

    let mut tasks = JoinSet::new();
    for index in 0..100 {
        let ledger = Arc::clone(&ledger);
        tasks.spawn(async move {
            let result = ledger
                .place_hold(hold_of(&format!("r{index}"), &consumer(), 10))
                .await;
            let balance = balance_of(ledger.as_ref(), &consumer()).await;
            (result, balance)
        });
    }

    let mut succeeded = 0;
    while let Some(joined) = tasks.join_next().await {
        let (result, balance) = joined.expect("hold task did not panic");
        assert!(
            balance.balance >= MicroUsd::ZERO,
            "balance went to {}",
            balance.balance
        );
        assert!(
            balance.available() >= MicroUsd::ZERO,
            "available balance went to {}",
            balance.available()
        );
        match result {
            Ok(()) => succeeded += 1,
            // No hold is released here, so a hold fails only after nine holds
            // have left 5 available.
            Err(error) => assert_eq!(
                error,
                LedgerError::InsufficientFunds {
                    available: micro(5),
                    requested: micro(10),
                }
            ),
        }
    }

    assert_eq!(succeeded, 9);
    let balance = balance_of(ledger.as_ref(), &consumer()).await;
    assert_eq!(balance.balance, micro(95));
    assert_eq!(balance.held, micro(90));
    assert_eq!(balance.available(), micro(5));
    assert_eq!(
        entries_total_of(ledger.as_ref(), &consumer()).await,
        micro(5)
    );
}

/// Returns the settlement cost of lifecycle `index`, spread over 0 to 100, which
/// is the hold of every lifecycle.
fn lifecycle_cost(index: i64) -> i64 {
    index * 37 % 101
}

/// Ends lifecycle `index` after its hold succeeded. Every fourth lifecycle is
/// released, and the others are settled at [`lifecycle_cost`]. Returns the
/// receipt, or a receipt with a zero charge for a release.
async fn finish_lifecycle(ledger: &dyn Ledger, index: i64) -> SettlementReceipt {
    let id = format!("r{index}");
    if index % 4 == 0 {
        ledger.release(&request(&id)).await.expect("hold exists");
        return SettlementReceipt {
            charged: MicroUsd::ZERO,
            released: micro(100),
            provider_earning: MicroUsd::ZERO,
            platform_fee: MicroUsd::ZERO,
        };
    }
    let receipt = settle(ledger, &id, lifecycle_cost(index)).await;
    assert_eq!(receipt.charged, micro(lifecycle_cost(index)));
    assert_eq!(receipt.charged + receipt.released, micro(100));
    assert_eq!(
        receipt.provider_earning + receipt.platform_fee,
        receipt.charged
    );
    receipt
}

/// Asserts the consumer and provider balances after concurrent lifecycles that
/// charged `charged` and earned the provider `earned`, from an opening balance
/// of 1000.
async fn assert_lifecycles_balanced(ledger: &dyn Ledger, charged: MicroUsd, earned: MicroUsd) {
    assert!(
        charged <= micro(1_000),
        "charged {charged} from a balance of 1000"
    );
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert!(
        balance.balance >= MicroUsd::ZERO,
        "balance went to {}",
        balance.balance
    );
    assert_eq!(balance.balance, micro(1_000) - charged);
    assert_entries_match(ledger, &consumer()).await;

    assert_eq!(earnings_of(ledger, &provider()).await, earned);
    assert_eq!(balance_of(ledger, &provider()).await.balance, earned);
    assert_entries_match(ledger, &provider()).await;
}

contract_test!(concurrent_lifecycles_cap_holds, concurrent);
async fn concurrent_lifecycles_cap_holds(ledger: Arc<dyn Ledger>) {
    open_accounts(ledger.as_ref(), 1_000).await;

    // Every lifecycle waits after its hold attempt until all 100 attempts are
    // done, so no money comes back before the last hold. Without this, a
    // settlement or release returns money and later holds may succeed too.
    let barrier = Arc::new(Barrier::new(100));
    let mut tasks = JoinSet::new();
    for index in 0..100_i64 {
        let ledger = Arc::clone(&ledger);
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            let hold = ledger
                .place_hold(hold_of(&format!("r{index}"), &consumer(), 100))
                .await;
            barrier.wait().await;
            match hold {
                Ok(()) => Ok(finish_lifecycle(ledger.as_ref(), index).await),
                Err(error) => Err(error),
            }
        });
    }

    let mut placed = 0;
    let mut charged = MicroUsd::ZERO;
    let mut earned = MicroUsd::ZERO;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("lifecycle task did not panic") {
            Ok(receipt) => {
                placed += 1;
                charged = charged + receipt.charged;
                earned = earned + receipt.provider_earning;
            }
            Err(error) => assert_eq!(
                error,
                LedgerError::InsufficientFunds {
                    available: MicroUsd::ZERO,
                    requested: micro(100),
                }
            ),
        }
    }

    assert_eq!(
        placed, 10,
        "a balance of 1000 covers exactly 10 holds of 100"
    );
    assert_lifecycles_balanced(ledger.as_ref(), charged, earned).await;
}

contract_test!(interleaved_lifecycles_balance, concurrent);
async fn interleaved_lifecycles_balance(ledger: Arc<dyn Ledger>) {
    open_accounts(ledger.as_ref(), 1_000).await;

    // Unlike concurrent_lifecycles_cap_holds, each lifecycle ends as soon as
    // its hold is placed, so holds, settlements and releases interleave.
    let mut tasks = JoinSet::new();
    for index in 0..100_i64 {
        let ledger = Arc::clone(&ledger);
        tasks.spawn(async move {
            let hold = ledger
                .place_hold(hold_of(&format!("r{index}"), &consumer(), 100))
                .await;
            match hold {
                Ok(()) => Ok(finish_lifecycle(ledger.as_ref(), index).await),
                Err(error) => Err(error),
            }
        });
    }

    let mut placed = 0;
    let mut charged = MicroUsd::ZERO;
    let mut earned = MicroUsd::ZERO;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("lifecycle task did not panic") {
            Ok(receipt) => {
                placed += 1;
                charged = charged + receipt.charged;
                earned = earned + receipt.provider_earning;
            }
            Err(LedgerError::InsufficientFunds {
                available,
                requested,
            }) => {
                assert_eq!(requested, micro(100));
                assert!(
                    available < micro(100),
                    "hold rejected with {available} available"
                );
            }
            Err(error) => panic!("unexpected hold error: {error}"),
        }
    }

    assert!(placed >= 1, "no hold succeeded");
    assert_lifecycles_balanced(ledger.as_ref(), charged, earned).await;
}

contract_test!(mutual_settlements_succeed, concurrent);
/// Settles requests concurrently between two accounts that are each other's
/// provider, as an operator who both consumes and serves would be. Postgres
/// deadlocks here unless settlements lock account rows in one order.
async fn mutual_settlements_succeed(ledger: Arc<dyn Ledger>) {
    let alice = AccountId::new("alice");
    let bob = AccountId::new("bob");
    for account in [&alice, &bob] {
        ledger
            .create_account(account)
            .await
            .expect("account is created");
        ledger
            .credit(account, micro(1_000_000), "opening-deposit")
            .await
            .expect("account exists");
    }

    // Alice sends the even requests, which Bob serves. Bob sends the odd ones,
    // which Alice serves.
    let parties = |index: usize| match index % 2 {
        0 => (alice.clone(), bob.clone()),
        _ => (bob.clone(), alice.clone()),
    };
    for index in 0..40 {
        let (consumer, _) = parties(index);
        ledger
            .place_hold(hold_of(&format!("r{index}"), &consumer, 100))
            .await
            .expect("hold fits the balance");
    }

    let mut tasks = JoinSet::new();
    for index in 0..40 {
        let ledger = Arc::clone(&ledger);
        let (_, provider) = parties(index);
        tasks.spawn(async move {
            ledger
                .settle(settlement_of(&format!("r{index}"), 50, Some(provider)))
                .await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let receipt = joined
            .expect("settlement task did not panic")
            .unwrap_or_else(|error| panic!("settlement failed: {error:?}"));
        // 5 % of 50 is 2.5, rounded down to 2.
        assert_eq!(receipt.provider_earning, micro(48));
        assert_eq!(receipt.platform_fee, micro(2));
    }

    // Each account paid 20 × 50 and earned 20 × 48.
    for account in [&alice, &bob] {
        let balance = balance_of(ledger.as_ref(), account).await;
        assert_eq!(balance.balance, micro(1_000_000 - 1_000 + 960), "{account}");
        assert_eq!(balance.held, MicroUsd::ZERO, "{account}");
        assert_eq!(
            earnings_of(ledger.as_ref(), account).await,
            micro(960),
            "{account}"
        );
        assert_entries_match(ledger.as_ref(), account).await;
    }
}

contract_test!(credit_idempotent_by_reference);
async fn credit_idempotent_by_reference(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");

    let first = ledger
        .credit(&consumer(), micro(500), "deposit-1")
        .await
        .expect("account exists");
    let repeated = ledger
        .credit(&consumer(), micro(500), "deposit-1")
        .await
        .expect("account exists");

    let expected = AccountBalance {
        balance: micro(500),
        held: MicroUsd::ZERO,
    };
    assert_eq!(first, expected);
    assert_eq!(repeated, expected);
    assert_eq!(balance_of(ledger, &consumer()).await, expected);
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(500));

    // A new reference adds again.
    let second = ledger
        .credit(&consumer(), micro(250), "deposit-2")
        .await
        .expect("account exists");

    assert_eq!(second.balance, micro(750));
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(750));
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(750));

    // Creating the account again leaves its balance alone.
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(750));
}

contract_test!(credit_rejects_invalid_input);
async fn credit_rejects_invalid_input(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;
    let stranger = AccountId::new("nobody");

    assert_eq!(
        ledger.credit(&stranger, micro(100), "deposit-1").await,
        Err(LedgerError::AccountNotFound(stranger.clone()))
    );
    assert_eq!(
        ledger.balance(&stranger).await,
        Err(LedgerError::AccountNotFound(stranger))
    );

    assert_eq!(
        ledger.credit(&consumer(), micro(-1), "refund-1").await,
        Err(LedgerError::InvalidAmount(micro(-1)))
    );
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(1_000));
    assert_eq!(entries_total_of(ledger, &consumer()).await, micro(1_000));
}

contract_test!(authenticate_issued_key);
async fn authenticate_issued_key(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");

    let issued = ledger
        .issue_api_key(&consumer(), "laptop")
        .await
        .expect("account exists");

    assert!(
        issued.secret.starts_with(API_KEY_PREFIX),
        "key is {}",
        issued.secret
    );
    assert_eq!(issued.display_prefix, display_prefix(&issued.secret));
    let info = ledger
        .authenticate(SecretHash::of(&issued.secret))
        .await
        .expect("ledger is available");
    assert_eq!(
        info,
        Some(ApiKeyInfo {
            account_id: consumer(),
            display_prefix: display_prefix(&issued.secret),
            limits: RateLimits::default(),
        })
    );

    let unknown = generate_secret(API_KEY_PREFIX);
    let info = ledger
        .authenticate(SecretHash::of(&unknown))
        .await
        .expect("ledger is available");
    assert_eq!(info, None);
}

contract_test!(authenticate_added_key);
async fn authenticate_added_key(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");

    ledger
        .add_api_key(&consumer(), "sy_dev_fixed_key_for_tests", "dev")
        .await
        .expect("account exists");

    let info = ledger
        .authenticate(SecretHash::of("sy_dev_fixed_key_for_tests"))
        .await
        .expect("ledger is available");
    assert_eq!(
        info,
        Some(ApiKeyInfo {
            account_id: consumer(),
            display_prefix: "sy_dev_fixed".to_owned(),
            limits: RateLimits::default(),
        })
    );
}

contract_test!(revoked_key_not_found);
async fn revoked_key_not_found(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");
    let revoked = ledger
        .issue_api_key(&consumer(), "old")
        .await
        .expect("account exists");
    let other_key = ledger
        .issue_api_key(&consumer(), "new")
        .await
        .expect("account exists");

    let hash = ledger
        .revoke_api_key(&revoked.display_prefix)
        .await
        .expect("key exists");

    assert_eq!(hash, SecretHash::of(&revoked.secret));
    let info = ledger
        .authenticate(SecretHash::of(&revoked.secret))
        .await
        .expect("ledger is available");
    assert_eq!(info, None);

    // Other keys of the account still work.
    let info = ledger
        .authenticate(SecretHash::of(&other_key.secret))
        .await
        .expect("ledger is available");
    assert_eq!(info.map(|info| info.account_id), Some(consumer()));

    // A revoked key cannot be revoked again.
    assert_eq!(
        ledger.revoke_api_key(&revoked.display_prefix).await,
        Err(LedgerError::KeyNotFound(revoked.display_prefix.clone()))
    );
}

contract_test!(revoke_unknown_key);
async fn revoke_unknown_key(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account is created");
    ledger
        .issue_api_key(&consumer(), "laptop")
        .await
        .expect("account exists");

    assert_eq!(
        ledger.revoke_api_key("sy_000000000").await,
        Err(LedgerError::KeyNotFound("sy_000000000".to_owned()))
    );
}

contract_test!(add_key_unknown_account);
async fn add_key_unknown_account(ledger: &dyn Ledger) {
    let stranger = AccountId::new("nobody");

    assert_eq!(
        ledger
            .add_api_key(&stranger, "sy_dev_fixed_key_for_tests", "dev")
            .await,
        Err(LedgerError::AccountNotFound(stranger.clone()))
    );
    assert_eq!(
        ledger.issue_api_key(&stranger, "laptop").await,
        Err(LedgerError::AccountNotFound(stranger.clone()))
    );
    let info = ledger
        .authenticate(SecretHash::of("sy_dev_fixed_key_for_tests"))
        .await
        .expect("ledger is available");
    assert_eq!(info, None);
    assert_eq!(
        ledger.balance(&stranger).await,
        Err(LedgerError::AccountNotFound(stranger))
    );
}

contract_test!(provider_token_resolves_account);
async fn provider_token_resolves_account(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;

    let token = ledger
        .issue_provider_token(&provider())
        .await
        .expect("provider account exists");

    assert!(
        token.secret.starts_with(PROVIDER_TOKEN_PREFIX),
        "token is {}",
        token.secret
    );
    assert_eq!(token.display_prefix, display_prefix(&token.secret));
    let account = ledger
        .provider_account(SecretHash::of(&token.secret))
        .await
        .expect("ledger is available");
    assert_eq!(account, Some(provider()));

    let unknown = generate_secret(PROVIDER_TOKEN_PREFIX);
    let account = ledger
        .provider_account(SecretHash::of(&unknown))
        .await
        .expect("ledger is available");
    assert_eq!(account, None);
}

contract_test!(provider_token_not_api_key);
async fn provider_token_not_api_key(ledger: &dyn Ledger) {
    open_accounts(ledger, 1_000).await;
    let token = ledger
        .issue_provider_token(&provider())
        .await
        .expect("provider account exists");
    let key = ledger
        .issue_api_key(&consumer(), "laptop")
        .await
        .expect("consumer account exists");

    let as_api_key = ledger
        .authenticate(SecretHash::of(&token.secret))
        .await
        .expect("ledger is available");
    assert_eq!(as_api_key, None);

    let as_provider_token = ledger
        .provider_account(SecretHash::of(&key.secret))
        .await
        .expect("ledger is available");
    assert_eq!(as_provider_token, None);

    let stranger = AccountId::new("nobody");
    assert_eq!(
        ledger.issue_provider_token(&stranger).await,
        Err(LedgerError::AccountNotFound(stranger))
    );
}

contract_test!(usage_pages_newest_first);
async fn usage_pages_newest_first(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    for index in 1..=5 {
        let id = format!("r{index}");
        place(ledger, &id, 1_000).await;
        let mut settlement = settlement_of(&id, index * 100, Some(provider()));
        if index % 2 == 0 {
            settlement.outcome = Outcome::ConsumerDisconnected;
        }
        ledger.settle(settlement).await.expect("hold exists");
    }

    let first_page = ledger
        .usage(&consumer(), 2, None)
        .await
        .expect("ledger is available");
    let ids: Vec<&str> = first_page
        .iter()
        .map(|record| record.request_id.as_str())
        .collect();
    assert_eq!(ids, ["r5", "r4"]);
    assert!(first_page[0].sequence > first_page[1].sequence);
    assert_eq!(first_page[0].cost, micro(500));
    assert_eq!(first_page[0].outcome, Outcome::Completed);
    assert_eq!(first_page[1].cost, micro(400));
    assert_eq!(first_page[1].outcome, Outcome::ConsumerDisconnected);

    let second_page = ledger
        .usage(&consumer(), 2, Some(first_page[1].sequence))
        .await
        .expect("ledger is available");
    let ids: Vec<&str> = second_page
        .iter()
        .map(|record| record.request_id.as_str())
        .collect();
    assert_eq!(ids, ["r3", "r2"]);
    assert!(second_page[0].sequence > second_page[1].sequence);
    assert!(second_page[0].sequence < first_page[1].sequence);
    assert_eq!(second_page[0].cost, micro(300));
    assert_eq!(second_page[1].cost, micro(200));

    let last_page = ledger
        .usage(&consumer(), 2, Some(second_page[1].sequence))
        .await
        .expect("ledger is available");
    let ids: Vec<&str> = last_page
        .iter()
        .map(|record| record.request_id.as_str())
        .collect();
    assert_eq!(ids, ["r1"]);

    // The usage of another account contains none of the consumer's requests.
    assert_eq!(usage_of(ledger, &provider()).await, Vec::new());
}

contract_test!(stale_holds_released_once);
async fn stale_holds_released_once(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    place(ledger, "r1", 1_000).await;
    place(ledger, "r2", 2_000).await;
    place(ledger, "r3", 3_000).await;
    let receipt = settle(ledger, "r3", 1_001).await;

    // None of the open holds is an hour old.
    let released = ledger
        .release_stale_holds(Duration::from_secs(3_600))
        .await
        .expect("ledger is available");

    assert_eq!(released, 0);
    assert_eq!(balance_of(ledger, &consumer()).await.held, micro(3_000));

    let released = ledger
        .release_stale_holds(Duration::ZERO)
        .await
        .expect("ledger is available");

    assert_eq!(released, 2);
    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(balance.balance, micro(8_999));
    assert_eq!(earnings_of(ledger, &provider()).await, micro(951));
    assert_entries_match(ledger, &consumer()).await;
    assert_entries_match(ledger, &provider()).await;

    // r3 is still settled with its charge. r1 was released, so settling it now
    // charges nothing.
    assert_eq!(settle(ledger, "r3", 1_001).await, receipt);
    let late = settle(ledger, "r1", 500).await;
    assert_eq!(late.charged, MicroUsd::ZERO);
    assert_eq!(late.released, micro(1_000));

    let released = ledger
        .release_stale_holds(Duration::ZERO)
        .await
        .expect("ledger is available");

    assert_eq!(released, 0);
    assert_eq!(balance_of(ledger, &consumer()).await.balance, micro(8_999));
}

contract_test!(backend_check_succeeds);
async fn backend_check_succeeds(ledger: &dyn Ledger) {
    assert_eq!(ledger.check().await, Ok(()));
}

contract_test!(rate_limits_follow_keys);
async fn rate_limits_follow_keys(ledger: &dyn Ledger) {
    ledger
        .create_account(&consumer())
        .await
        .expect("account created");
    let key = ledger
        .issue_api_key(&consumer(), "limits")
        .await
        .expect("key issued")
        .secret;
    let limits = RateLimits {
        requests_per_minute: Some(60),
        tokens_per_minute: None,
    };

    ledger
        .set_rate_limits(&consumer(), limits)
        .await
        .expect("limits set");
    let info = ledger
        .authenticate(SecretHash::of(&key))
        .await
        .expect("lookup works")
        .expect("key found");
    assert_eq!(info.limits, limits);

    assert_eq!(
        ledger
            .set_rate_limits(&AccountId::new("nobody"), limits)
            .await,
        Err(LedgerError::AccountNotFound(AccountId::new("nobody")))
    );
}

contract_test!(orphaned_holds_released);
async fn orphaned_holds_released(ledger: &dyn Ledger) {
    open_accounts(ledger, 10_000).await;
    let on_node = |id: &str, node: &str| HoldRequest {
        node_id: NodeId::new(node),
        ..hold_of(id, &consumer(), 1_000)
    };
    for (id, node) in [
        ("live-open", "live"),
        ("dead-open", "dead"),
        ("dead-settled", "dead"),
    ] {
        ledger
            .place_hold(on_node(id, node))
            .await
            .expect("hold fits");
    }
    let receipt = settle(ledger, "dead-settled", 400).await;
    assert_eq!(receipt.charged, micro(400));

    let released = ledger
        .release_orphaned_holds(&[NodeId::new("live")], Duration::ZERO)
        .await
        .expect("ledger is available");
    assert_eq!(released, 1, "only the dead node's open hold");

    let balance = balance_of(ledger, &consumer()).await;
    assert_eq!(balance.held, micro(1_000), "the live node's hold stays");
    assert_eq!(
        balance.balance,
        micro(10_000 - 400),
        "the settled charge stays"
    );

    let young = ledger
        .release_orphaned_holds(&[], Duration::from_secs(3600))
        .await
        .expect("ledger is available");
    assert_eq!(young, 0, "holds younger than the grace period stay");
}

contract_test!(models_upsert_and_list);
async fn models_upsert_and_list(ledger: &dyn Ledger) {
    assert_eq!(
        ledger.list_models().await,
        Ok(Vec::new()),
        "a new ledger has no models"
    );

    let seed = crate::catalog::Catalog::builtin();
    let catalog = crate::catalog::SharedCatalog::new(
        crate::catalog::Catalog::from_entries(Vec::new(), 0).expect("empty catalog"),
    );
    sync_catalog(ledger, &seed, &catalog)
        .await
        .expect("seeding works");
    let listed = ledger.list_models().await.expect("models listed");
    assert_eq!(
        listed.len(),
        seed.entries().count(),
        "an empty table is seeded"
    );
    assert_eq!(catalog.snapshot().entries().count(), seed.entries().count());

    let mut changed = listed[0].clone();
    changed.input_per_mtok = 7;
    changed.enabled = false;
    ledger.upsert_model(&changed).await.expect("model replaced");
    sync_catalog(ledger, &seed, &catalog)
        .await
        .expect("reload works");
    let listed = ledger.list_models().await.expect("models listed");
    assert_eq!(
        listed.len(),
        seed.entries().count(),
        "a replaced model is not duplicated"
    );
    assert!(listed.contains(&changed));
    assert!(
        catalog.get(changed.id.as_str()).is_none(),
        "a disabled model is not served"
    );
}

mod postgres_only {
    use super::*;

    /// The newest migration version this build embeds.
    fn expected_version() -> i64 {
        MIGRATOR
            .iter()
            .map(|migration| migration.version)
            .max()
            .expect("the build embeds at least one migration")
    }

    /// SQLSTATE of a database error, or `None` for any other error.
    fn sqlstate(error: &sqlx::Error) -> Option<String> {
        match error {
            sqlx::Error::Database(database) => database.code().map(|code| code.into_owned()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn check_schema_accepts_migrated() {
        run_on_database(|ledger| async move {
            assert_eq!(ledger.check_schema().await, Ok(()));
        })
        .await;
    }

    #[tokio::test]
    async fn check_schema_without_migrations() {
        run_on_database(|ledger| async move {
            sqlx::query("DELETE FROM _sqlx_migrations")
                .execute(ledger.pool())
                .await
                .expect("migration records are deleted");

            assert_eq!(
                ledger.check_schema().await,
                Err(LedgerError::SchemaMismatch {
                    found: 0,
                    expected: expected_version(),
                })
            );
        })
        .await;
    }

    #[tokio::test]
    async fn check_schema_without_migrations_table() {
        run_on_database(|ledger| async move {
            // A database that was never migrated has no migrations table.
            sqlx::query("DROP TABLE _sqlx_migrations")
                .execute(ledger.pool())
                .await
                .expect("migrations table is dropped");

            assert_eq!(
                ledger.check_schema().await,
                Err(LedgerError::SchemaMismatch {
                    found: 0,
                    expected: expected_version(),
                })
            );
        })
        .await;
    }

    #[tokio::test]
    async fn check_schema_rejects_newer_version() {
        run_on_database(|ledger| async move {
            // As if a newer build had applied one more migration.
            sqlx::query("UPDATE _sqlx_migrations SET version = $1 WHERE version = $2")
                .bind(expected_version() + 1)
                .bind(expected_version())
                .execute(ledger.pool())
                .await
                .expect("migration records are updated");

            assert_eq!(
                ledger.check_schema().await,
                Err(LedgerError::SchemaMismatch {
                    found: expected_version() + 1,
                    expected: expected_version(),
                })
            );
        })
        .await;
    }

    #[tokio::test]
    async fn schema_rejects_negative_balance() {
        run_on_database(|ledger| async move {
            open_accounts(&ledger, 100).await;

            let error = sqlx::query("UPDATE accounts SET balance_micro_usd = -1 WHERE id = $1")
                .bind(consumer().as_str())
                .execute(ledger.pool())
                .await
                .expect_err("a negative balance violates the CHECK constraint");

            // 23514 is check_violation.
            assert_eq!(sqlstate(&error).as_deref(), Some("23514"), "error: {error}");
            assert_eq!(balance_of(&ledger, &consumer()).await.balance, micro(100));
        })
        .await;
    }

    #[tokio::test]
    async fn schema_rejects_duplicate_entry() {
        run_on_database(|ledger| async move {
            open_accounts(&ledger, 100).await;

            // open_accounts wrote the credit entry "opening-deposit" already.
            let error = sqlx::query(
                "INSERT INTO ledger_entries
                     (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
                 VALUES ($1, 'credit', 'opening-deposit', 100, 200)",
            )
            .bind(consumer().as_str())
            .execute(ledger.pool())
            .await
            .expect_err("a second credit entry with the same reference violates UNIQUE");

            // 23505 is unique_violation.
            assert_eq!(sqlstate(&error).as_deref(), Some("23505"), "error: {error}");
            assert_eq!(entries_total_of(&ledger, &consumer()).await, micro(100));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sweeps_release_once() {
        run_on_database(|ledger| async move {
            open_accounts(&ledger, 100_000).await;

            for round in 0..5 {
                for index in 0..20 {
                    place(&ledger, &format!("round{round}-r{index}"), 100).await;
                }

                // Two sweepers at once, as on two nodes. Each takes its own
                // connection for the advisory lock.
                let sweeps: Vec<_> = (0..2)
                    .map(|_| {
                        let ledger = ledger.clone();
                        tokio::spawn(
                            async move { ledger.release_stale_holds(Duration::ZERO).await },
                        )
                    })
                    .collect();
                let mut released = 0;
                for sweep in sweeps {
                    released += sweep
                        .await
                        .expect("sweep task did not panic")
                        .expect("sweep succeeds");
                }

                assert_eq!(
                    released, 20,
                    "round {round} released {released} of 20 holds"
                );
                let balance = balance_of(&ledger, &consumer()).await;
                assert_eq!(balance.held, MicroUsd::ZERO, "round {round}");
                assert_eq!(balance.balance, micro(100_000), "round {round}");
            }

            assert_entries_match(&ledger, &consumer()).await;
        })
        .await;
    }
}
