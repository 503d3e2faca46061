//! A settlement benchmark: many workers place a hold and settle it against one
//! ledger, as nodes do at the end of every request, and the run reports
//! settlements per second with latency percentiles. Afterwards it checks that
//! every request was settled exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard_shared::ids::{AccountId, ConsumerRequestId, ModelId, NodeId};
use switchyard_shared::ledger::{HoldRequest, Ledger, LedgerError, Outcome, Settlement};
use switchyard_shared::money::MicroUsd;

/// Settings of one benchmark run.
#[derive(Clone, Debug)]
pub struct LedgerBenchConfig {
    /// Requests to hold and settle in all.
    pub requests: u64,
    /// Workers running at once, each one request at a time.
    pub concurrency: usize,
    /// Consumer accounts the requests are spread over (and as many provider
    /// accounts), so that settlements do not all queue on one account row.
    pub accounts: usize,
    /// Prefix of the account ids and request ids of this run.
    pub run_id: String,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct LedgerBenchReport {
    pub requests: u64,
    pub elapsed: Duration,
    /// Completed hold-and-settle pairs per second.
    pub settlements_per_second: f64,
    pub settle_p50: Duration,
    pub settle_p99: Duration,
    pub hold_p50: Duration,
    pub hold_p99: Duration,
    /// Usage rows found afterwards; equals `requests` when each settled once.
    pub usage_rows: u64,
}

const HOLD: MicroUsd = MicroUsd::new(10_000);
const COST: MicroUsd = MicroUsd::new(1_234);

fn consumer(config: &LedgerBenchConfig, index: usize) -> AccountId {
    AccountId::new(format!("{}-consumer-{index}", config.run_id))
}

fn provider(config: &LedgerBenchConfig, index: usize) -> AccountId {
    AccountId::new(format!("{}-provider-{index}", config.run_id))
}

/// Runs the benchmark on `ledger`.
pub async fn run(
    ledger: Arc<dyn Ledger>,
    config: LedgerBenchConfig,
) -> Result<LedgerBenchReport, LedgerError> {
    let accounts = config.accounts.max(1);
    let per_account = HOLD.get() * (config.requests as i64 / accounts as i64 + 1);
    for index in 0..accounts {
        ledger.create_account(&consumer(&config, index)).await?;
        ledger
            .credit(
                &consumer(&config, index),
                MicroUsd::new(per_account),
                "bench-seed",
            )
            .await?;
        ledger.create_account(&provider(&config, index)).await?;
    }

    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (ledger, config, next) = (ledger.clone(), config.clone(), next.clone());
        workers.spawn(async move { worker(ledger.as_ref(), &config, &next).await });
    }

    let mut holds = new_histogram();
    let mut settles = new_histogram();
    while let Some(joined) = workers.join_next().await {
        let (worker_holds, worker_settles) =
            joined.map_err(|error| LedgerError::Unavailable(Box::new(error)))??;
        holds.add(worker_holds).ok();
        settles.add(worker_settles).ok();
    }
    let elapsed = started.elapsed();

    let mut usage_rows = 0;
    for index in 0..accounts {
        let mut before = None;
        loop {
            let page = ledger.usage(&consumer(&config, index), 500, before).await?;
            usage_rows += page.len() as u64;
            match page.last() {
                Some(last) if page.len() == 500 => before = Some(last.sequence),
                _ => break,
            }
        }
    }

    Ok(LedgerBenchReport {
        requests: config.requests,
        elapsed,
        settlements_per_second: config.requests as f64 / elapsed.as_secs_f64(),
        settle_p50: Duration::from_micros(settles.value_at_quantile(0.5)),
        settle_p99: Duration::from_micros(settles.value_at_quantile(0.99)),
        hold_p50: Duration::from_micros(holds.value_at_quantile(0.5)),
        hold_p99: Duration::from_micros(holds.value_at_quantile(0.99)),
        usage_rows,
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Holds and settles requests until the shared counter passes the total.
async fn worker(
    ledger: &dyn Ledger,
    config: &LedgerBenchConfig,
    next: &std::sync::atomic::AtomicU64,
) -> Result<(Histogram<u64>, Histogram<u64>), LedgerError> {
    let mut holds = new_histogram();
    let mut settles = new_histogram();
    loop {
        let sequence = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if sequence >= config.requests {
            return Ok((holds, settles));
        }
        let account = sequence as usize % config.accounts.max(1);
        let request_id = ConsumerRequestId::new(format!("{}-{sequence}", config.run_id));

        let started = Instant::now();
        ledger
            .place_hold(HoldRequest {
                request_id: request_id.clone(),
                account_id: consumer(config, account),
                key_prefix: "bench".to_owned(),
                amount: HOLD,
                node_id: NodeId::from("bench"),
            })
            .await?;
        holds.record(started.elapsed().as_micros() as u64).ok();

        let started = Instant::now();
        ledger
            .settle(Settlement {
                request_id,
                model: ModelId::from("bench-model"),
                prompt_tokens: 1_000,
                completion_tokens: 200,
                cost: COST,
                platform_fee_bps: 500,
                provider_account: Some(provider(config, account)),
                provider_key: "bench-provider".to_owned(),
                node_id: NodeId::from("bench"),
                outcome: Outcome::Completed,
            })
            .await?;
        settles.record(started.elapsed().as_micros() as u64).ok();
    }
}
