use std::sync::Arc;

use super::*;

/// Platform fee of every settlement in these tests, in basis points (5 %).
const FEE_BPS: u32 = 500;

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
        outcome: Outcome::Completed,
    }
}

/// Creates a ledger with a consumer account of `balance` micro-USD and an empty
/// provider account.
fn funded_ledger(balance: i64) -> MemoryLedger {
    let ledger = MemoryLedger::new();
    ledger.credit(&consumer(), micro(balance));
    ledger.credit(&provider(), MicroUsd::ZERO);
    ledger
}

async fn balance_of(ledger: &MemoryLedger, account: &AccountId) -> AccountBalance {
    ledger.balance(account).await.expect("account exists")
}

#[tokio::test]
async fn hold_reserves_available_balance() {
    let ledger = funded_ledger(1_000);

    ledger
        .place_hold(hold_of("r1", &consumer(), 400))
        .await
        .expect("hold fits the balance");

    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, micro(400));
    assert_eq!(balance.available(), micro(600));
    assert_eq!(ledger.open_holds(), 1);
}

#[tokio::test]
async fn hold_of_whole_available_balance() {
    let ledger = funded_ledger(1_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 400))
        .await
        .expect("first hold fits");

    ledger
        .place_hold(hold_of("r2", &consumer(), 600))
        .await
        .expect("a hold equal to the available balance fits");

    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.held, micro(1_000));
    assert_eq!(balance.available(), MicroUsd::ZERO);
}

#[tokio::test]
async fn hold_over_available_rejected() {
    let ledger = funded_ledger(1_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 700))
        .await
        .expect("first hold fits");

    let result = ledger.place_hold(hold_of("r2", &consumer(), 400)).await;

    assert_eq!(
        result,
        Err(LedgerError::InsufficientFunds {
            available: micro(300),
            requested: micro(400),
        })
    );
    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(1_000));
    assert_eq!(balance.held, micro(700));
    assert_eq!(ledger.open_holds(), 1);
    // The rejected hold was not recorded.
    assert_eq!(
        ledger.release(&request("r2")).await,
        Err(LedgerError::HoldNotFound(request("r2")))
    );
}

#[tokio::test]
async fn hold_on_unknown_account() {
    let ledger = funded_ledger(1_000);
    let stranger = AccountId::new("nobody");

    let result = ledger.place_hold(hold_of("r1", &stranger, 1)).await;

    assert_eq!(result, Err(LedgerError::AccountNotFound(stranger)));
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn duplicate_hold_rejected() {
    let ledger = funded_ledger(1_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 100))
        .await
        .expect("first hold fits");

    let result = ledger.place_hold(hold_of("r1", &consumer(), 200)).await;

    assert_eq!(result, Err(LedgerError::DuplicateHold(request("r1"))));
    assert_eq!(balance_of(&ledger, &consumer()).await.held, micro(100));
    assert_eq!(ledger.open_holds(), 1);
}

#[tokio::test]
async fn duplicate_hold_after_settle_rejected() {
    let ledger = funded_ledger(1_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 100))
        .await
        .expect("first hold fits");
    ledger
        .settle(settlement_of("r1", 50, Some(provider())))
        .await
        .expect("hold exists");

    let result = ledger.place_hold(hold_of("r1", &consumer(), 100)).await;

    assert_eq!(result, Err(LedgerError::DuplicateHold(request("r1"))));
    assert_eq!(balance_of(&ledger, &consumer()).await.held, MicroUsd::ZERO);
}

#[tokio::test]
async fn settle_charges_cost_and_pays_provider() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 5_000))
        .await
        .expect("hold fits");

    let receipt = ledger
        .settle(settlement_of("r1", 1_001, Some(provider())))
        .await
        .expect("hold exists");

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
    assert_eq!(
        receipt.provider_earning + receipt.platform_fee,
        receipt.charged
    );

    let consumer_balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(8_999));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);

    let provider_balance = balance_of(&ledger, &provider()).await;
    assert_eq!(provider_balance.balance, micro(951));
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        micro(951)
    );
    assert_eq!(ledger.platform_revenue(), micro(50));
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn settle_caps_charge_at_hold() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 1_000))
        .await
        .expect("hold fits");

    let receipt = ledger
        .settle(settlement_of("r1", 2_500, Some(provider())))
        .await
        .expect("hold exists");

    assert_eq!(receipt.charged, micro(1_000));
    assert_eq!(receipt.released, MicroUsd::ZERO);
    assert_eq!(receipt.platform_fee, micro(50));
    assert_eq!(receipt.provider_earning, micro(950));

    let consumer_balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(consumer_balance.balance, micro(9_000));
    assert_eq!(consumer_balance.held, MicroUsd::ZERO);
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        micro(950)
    );
    assert_eq!(ledger.platform_revenue(), micro(50));
}

#[tokio::test]
async fn settle_unlinked_provider_to_platform() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 5_000))
        .await
        .expect("hold fits");

    let receipt = ledger
        .settle(settlement_of("r1", 1_001, None))
        .await
        .expect("hold exists");

    assert_eq!(receipt.charged, micro(1_001));
    assert_eq!(receipt.released, micro(3_999));
    assert_eq!(ledger.platform_revenue(), micro(1_001));
    assert_eq!(balance_of(&ledger, &consumer()).await.balance, micro(8_999));
    assert_eq!(
        balance_of(&ledger, &provider()).await.balance,
        MicroUsd::ZERO
    );
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        MicroUsd::ZERO
    );
}

#[tokio::test]
async fn settle_twice_charges_once() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 5_000))
        .await
        .expect("hold fits");

    let first = ledger
        .settle(settlement_of("r1", 1_001, Some(provider())))
        .await
        .expect("hold exists");
    // A retried settlement with a different cost still returns the first receipt.
    let second = ledger
        .settle(settlement_of("r1", 4_000, Some(provider())))
        .await
        .expect("hold exists");

    assert_eq!(second, first);
    assert_eq!(balance_of(&ledger, &consumer()).await.balance, micro(8_999));
    assert_eq!(balance_of(&ledger, &consumer()).await.held, MicroUsd::ZERO);
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        micro(951)
    );
    assert_eq!(ledger.platform_revenue(), micro(50));
}

#[tokio::test]
async fn release_returns_whole_hold() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 3_000))
        .await
        .expect("hold fits");

    ledger.release(&request("r1")).await.expect("hold exists");

    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(10_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(ledger.open_holds(), 0);

    // Releasing again is a no-op.
    ledger.release(&request("r1")).await.expect("hold exists");
    assert_eq!(balance_of(&ledger, &consumer()).await.held, MicroUsd::ZERO);
}

#[tokio::test]
async fn settle_after_release_charges_nothing() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 3_000))
        .await
        .expect("hold fits");
    ledger.release(&request("r1")).await.expect("hold exists");

    let receipt = ledger
        .settle(settlement_of("r1", 1_001, Some(provider())))
        .await
        .expect("hold exists");

    assert_eq!(
        receipt,
        SettlementReceipt {
            charged: MicroUsd::ZERO,
            released: micro(3_000),
            provider_earning: MicroUsd::ZERO,
            platform_fee: MicroUsd::ZERO,
        }
    );
    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(10_000));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        MicroUsd::ZERO
    );
    assert_eq!(ledger.platform_revenue(), MicroUsd::ZERO);
}

#[tokio::test]
async fn release_after_settle_changes_nothing() {
    let ledger = funded_ledger(10_000);
    ledger
        .place_hold(hold_of("r1", &consumer(), 5_000))
        .await
        .expect("hold fits");
    let receipt = ledger
        .settle(settlement_of("r1", 1_001, Some(provider())))
        .await
        .expect("hold exists");

    ledger.release(&request("r1")).await.expect("hold exists");

    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(8_999));
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(
        ledger.earnings(&provider()).await.expect("account exists"),
        micro(951)
    );
    assert_eq!(ledger.platform_revenue(), micro(50));

    // The settlement is still the recorded outcome.
    let repeated = ledger
        .settle(settlement_of("r1", 1_001, Some(provider())))
        .await
        .expect("hold exists");
    assert_eq!(repeated, receipt);
}

#[tokio::test]
async fn unknown_request_hold_not_found() {
    let ledger = funded_ledger(10_000);

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
    assert_eq!(ledger.platform_revenue(), MicroUsd::ZERO);
    assert_eq!(
        balance_of(&ledger, &consumer()).await.balance,
        micro(10_000)
    );
}

#[tokio::test]
async fn authenticate_finds_issued_key() {
    let ledger = MemoryLedger::new();
    let key = ledger.issue_api_key(&consumer());
    assert!(key.starts_with(API_KEY_PREFIX));

    let info = ledger
        .authenticate(SecretHash::of(&key))
        .await
        .expect("memory ledger is available");

    assert_eq!(
        info,
        Some(ApiKeyInfo {
            account_id: consumer(),
            display_prefix: key.chars().take(10).collect(),
        })
    );
}

#[tokio::test]
async fn authenticate_rejects_unknown_key() {
    let ledger = MemoryLedger::new();
    ledger.issue_api_key(&consumer());
    let unknown = generate_secret(API_KEY_PREFIX);

    let info = ledger
        .authenticate(SecretHash::of(&unknown))
        .await
        .expect("memory ledger is available");

    assert_eq!(info, None);
}

#[tokio::test]
async fn authenticate_finds_added_key() {
    let ledger = MemoryLedger::new();
    ledger.add_api_key(&consumer(), "sy_dev_fixed_key_for_tests");

    let info = ledger
        .authenticate(SecretHash::of("sy_dev_fixed_key_for_tests"))
        .await
        .expect("memory ledger is available")
        .expect("added key resolves");

    assert_eq!(info.account_id, consumer());
    assert_eq!(info.display_prefix, "sy_dev_fix");
    // Adding a key creates the account with a zero balance.
    assert_eq!(
        balance_of(&ledger, &consumer()).await.balance,
        MicroUsd::ZERO
    );
}

#[tokio::test]
async fn provider_token_resolves_account() {
    let ledger = MemoryLedger::new();
    let token = ledger.issue_provider_token(&provider());
    assert!(token.starts_with(PROVIDER_TOKEN_PREFIX));

    let account = ledger
        .provider_account(SecretHash::of(&token))
        .await
        .expect("memory ledger is available");
    assert_eq!(account, Some(provider()));

    let unknown = generate_secret(PROVIDER_TOKEN_PREFIX);
    let missing = ledger
        .provider_account(SecretHash::of(&unknown))
        .await
        .expect("memory ledger is available");
    assert_eq!(missing, None);

    // A provider token is not an API key.
    let as_api_key = ledger
        .authenticate(SecretHash::of(&token))
        .await
        .expect("memory ledger is available");
    assert_eq!(as_api_key, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_holds_never_overdraw() {
    let ledger = Arc::new(funded_ledger(95));

    let tasks: Vec<_> = (0..100)
        .map(|index| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                let result = ledger
                    .place_hold(hold_of(&format!("r{index}"), &consumer(), 10))
                    .await;
                let available = balance_of(&ledger, &consumer()).await.available();
                (result, available)
            })
        })
        .collect();

    let mut succeeded = 0;
    for task in tasks {
        let (result, available) = task.await.expect("hold task did not panic");
        assert!(available >= MicroUsd::ZERO, "available went to {available}");
        match result {
            Ok(()) => succeeded += 1,
            Err(LedgerError::InsufficientFunds { requested, .. }) => {
                assert_eq!(requested, micro(10));
            }
            Err(other) => panic!("unexpected hold error: {other}"),
        }
    }

    assert_eq!(succeeded, 9);
    assert_eq!(ledger.open_holds(), 9);
    let balance = balance_of(&ledger, &consumer()).await;
    assert_eq!(balance.balance, micro(95));
    assert_eq!(balance.held, micro(90));
    assert_eq!(balance.available(), micro(5));
}
