//! Amounts of money and the pricing rule.
//!
//! Every amount is an integer number of micro-USD (1 USD = 1,000,000). Prices are
//! micro-USD per million tokens. Cost is computed exactly with `rust_decimal` and
//! rounded once, up, to a whole micro-USD; the platform fee is rounded down, so the
//! provider earning and the fee always add up to the cost exactly.

use std::fmt;
use std::ops::{Add, Sub};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};

/// An amount in micro-USD. Negative values appear only as signed ledger movements.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    pub const fn new(micro_usd: i64) -> Self {
        Self(micro_usd)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    /// Creates an amount from whole US dollars.
    pub const fn from_usd(usd: i64) -> Self {
        Self(usd * 1_000_000)
    }

    /// Parses a plain decimal amount of US dollars such as `12.5` or `0.000001`
    /// exactly. A sign, an exponent, more than six decimals or an amount too
    /// large for 64 bits is an error.
    pub fn parse_usd(text: &str) -> Result<MicroUsd, InvalidAmount> {
        const NOT_PLAIN: InvalidAmount =
            InvalidAmount("is not a plain decimal number such as 12.50");

        let text = text.trim();
        let plain = !text.is_empty()
            && text
                .chars()
                .all(|character| character.is_ascii_digit() || character == '.');
        if !plain {
            return Err(NOT_PLAIN);
        }
        let usd: Decimal = text.parse().map_err(|_| NOT_PLAIN)?;

        let micro = usd * Decimal::from(1_000_000);
        if micro.fract() != Decimal::ZERO {
            return Err(InvalidAmount("has more than six decimals"));
        }
        micro
            .to_i64()
            .map(MicroUsd)
            .ok_or(InvalidAmount("is too large"))
    }

    pub fn min(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.min(other.0))
    }

    pub fn max(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.max(other.0))
    }
}

impl Add for MicroUsd {
    type Output = MicroUsd;

    fn add(self, rhs: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(rhs.0))
    }
}

impl Sub for MicroUsd {
    type Output = MicroUsd;

    fn sub(self, rhs: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_sub(rhs.0))
    }
}

impl fmt::Display for MicroUsd {
    /// Formats as US dollars with six decimals, for example `1.250000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

/// Why a dollar amount could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount: {0}")]
pub struct InvalidAmount(&'static str);

/// Token prices of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    /// Micro-USD per million prompt tokens.
    pub input_per_mtok: MicroUsd,
    /// Micro-USD per million completion tokens.
    pub output_per_mtok: MicroUsd,
    /// Smallest charge for a request that is charged at all.
    pub min_charge: MicroUsd,
}

impl Prices {
    /// Returns the cost of a request: `(prompt × input + completion × output) / 10⁶`,
    /// computed exactly, rounded up to a whole micro-USD, and raised to the minimum
    /// charge unless both token counts are zero.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> MicroUsd {
        if prompt_tokens == 0 && completion_tokens == 0 {
            return MicroUsd::ZERO;
        }

        let exact = (Decimal::from(prompt_tokens) * Decimal::from(self.input_per_mtok.get())
            + Decimal::from(completion_tokens) * Decimal::from(self.output_per_mtok.get()))
            / Decimal::from(1_000_000);
        let rounded = exact.ceil().to_i64().unwrap_or(i64::MAX);

        MicroUsd(rounded).max(self.min_charge)
    }
}

/// How one settled cost is divided between the provider and the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeSplit {
    pub provider_earning: MicroUsd,
    pub platform_fee: MicroUsd,
}

impl FeeSplit {
    /// Splits `cost` with a platform fee of `fee_bps` basis points, rounded down; the
    /// provider receives the remainder, so the two parts always sum to `cost`. A
    /// fee above 10,000 basis points is treated as 10,000.
    pub fn of(cost: MicroUsd, fee_bps: u32) -> Self {
        let fee_bps = fee_bps.min(10_000);
        let fee = Decimal::from(cost.get()) * Decimal::from(fee_bps) / Decimal::from(10_000);
        let platform_fee = MicroUsd(fee.floor().to_i64().unwrap_or(0));

        FeeSplit {
            provider_earning: cost - platform_fee,
            platform_fee,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_PRICES: Prices = Prices {
        input_per_mtok: MicroUsd::new(50_000),
        output_per_mtok: MicroUsd::new(200_000),
        min_charge: MicroUsd::new(100),
    };

    #[test]
    fn cost_of_million_tokens_each() {
        assert_eq!(
            DEFAULT_PRICES.cost(1_000_000, 1_000_000),
            MicroUsd::new(250_000)
        );
    }

    #[test]
    fn cost_rounds_up_to_whole_micro_usd() {
        let prices = Prices {
            min_charge: MicroUsd::ZERO,
            ..DEFAULT_PRICES
        };
        // 3 × 0.05 + 7 × 0.2 = 1.55 micro-USD, rounded up to 2.
        assert_eq!(prices.cost(3, 7), MicroUsd::new(2));
    }

    #[test]
    fn cost_of_tiny_request_is_minimum_charge() {
        assert_eq!(DEFAULT_PRICES.cost(10, 5), MicroUsd::new(100));
    }

    #[test]
    fn cost_of_nothing_is_zero() {
        assert_eq!(DEFAULT_PRICES.cost(0, 0), MicroUsd::ZERO);
    }

    #[test]
    fn fee_split_sums_to_cost() {
        for cost in [0, 1, 99, 100, 1_001, 123_457, 98_765_431] {
            let split = FeeSplit::of(MicroUsd::new(cost), 500);
            assert_eq!(
                split.provider_earning + split.platform_fee,
                MicroUsd::new(cost)
            );
        }
        let split = FeeSplit::of(MicroUsd::new(1_001), 500);
        assert_eq!(split.platform_fee, MicroUsd::new(50));
        assert_eq!(split.provider_earning, MicroUsd::new(951));
    }

    /// The worked examples of `docs/billing.md`.
    #[test]
    fn billing_doc_worked_examples() {
        let trinity = Prices {
            input_per_mtok: MicroUsd::new(23_000),
            output_per_mtok: MicroUsd::new(75_000),
            min_charge: MicroUsd::new(100),
        };
        let split = |cost: i64| FeeSplit::of(MicroUsd::new(cost), 500);

        assert_eq!(trinity.cost(15, 16), MicroUsd::new(100));
        assert_eq!(
            split(100),
            FeeSplit {
                provider_earning: MicroUsd::new(95),
                platform_fee: MicroUsd::new(5)
            }
        );

        assert_eq!(trinity.cost(1_000_000, 1_000_000), MicroUsd::new(98_000));
        assert_eq!(
            split(98_000),
            FeeSplit {
                provider_earning: MicroUsd::new(93_100),
                platform_fee: MicroUsd::new(4_900)
            }
        );

        assert_eq!(
            split(5_000),
            FeeSplit {
                provider_earning: MicroUsd::new(4_750),
                platform_fee: MicroUsd::new(250)
            }
        );
    }

    #[test]
    fn parse_usd_is_exact() {
        assert_eq!(MicroUsd::parse_usd("12.5"), Ok(MicroUsd::new(12_500_000)));
        assert_eq!(MicroUsd::parse_usd("0.000001"), Ok(MicroUsd::new(1)));
        assert_eq!(MicroUsd::parse_usd("19.99"), Ok(MicroUsd::new(19_990_000)));
        assert!(MicroUsd::parse_usd("0.0000001").is_err());
        assert!(MicroUsd::parse_usd("-1").is_err());
        assert!(MicroUsd::parse_usd("1e3").is_err());
        assert!(MicroUsd::parse_usd("").is_err());
        assert!(MicroUsd::parse_usd("ten").is_err());
        assert!(MicroUsd::parse_usd("99999999999999999999").is_err());
    }

    #[test]
    fn display_as_dollars() {
        assert_eq!(MicroUsd::new(1_250_000).to_string(), "1.250000");
        assert_eq!(MicroUsd::new(-5).to_string(), "-0.000005");
    }
}
