-- The shared ledger: accounts, keys, catalog, holds, usage and ledger entries.
--
-- Amounts are integer micro-USD. `accounts.balance_micro_usd` is the available
-- balance: an open hold has already been debited from it and is counted in
-- `held_micro_usd`. Every change of an available balance is one row of
-- `ledger_entries`, and (account, kind, reference) is unique, so each hold,
-- release, earning and credit happens at most once per request or reference.
-- The platform's fee is recorded in `usage`, not credited to an account row, so
-- that settlements do not all queue on one hot row.

CREATE TABLE accounts (
    id TEXT PRIMARY KEY CHECK (id <> ''),
    balance_micro_usd BIGINT NOT NULL DEFAULT 0 CHECK (balance_micro_usd >= 0),
    held_micro_usd BIGINT NOT NULL DEFAULT 0 CHECK (held_micro_usd >= 0),
    earnings_micro_usd BIGINT NOT NULL DEFAULT 0 CHECK (earnings_micro_usd >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_hash BYTEA PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    account_id TEXT NOT NULL REFERENCES accounts (id),
    display_prefix TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);
CREATE INDEX api_keys_by_prefix ON api_keys (display_prefix);
CREATE INDEX api_keys_by_account ON api_keys (account_id);

CREATE TABLE provider_tokens (
    token_hash BYTEA PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    account_id TEXT NOT NULL REFERENCES accounts (id),
    display_prefix TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);
CREATE INDEX provider_tokens_by_account ON provider_tokens (account_id);

-- Providers seen by any node, by their X25519 key.
CREATE TABLE providers (
    public_key TEXT PRIMARY KEY,
    account_id TEXT REFERENCES accounts (id),
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id TEXT PRIMARY KEY CHECK (id <> ''),
    input_per_mtok BIGINT NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok BIGINT NOT NULL CHECK (output_per_mtok >= 0),
    min_charge BIGINT NOT NULL DEFAULT 0 CHECK (min_charge >= 0),
    default_max_tokens INTEGER NOT NULL DEFAULT 8192 CHECK (default_max_tokens > 0),
    replicas INTEGER NOT NULL DEFAULT 1 CHECK (replicas >= 1),
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    weight_hash TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE holds (
    request_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_prefix TEXT NOT NULL DEFAULT '',
    amount_micro_usd BIGINT NOT NULL CHECK (amount_micro_usd >= 0),
    node_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'released')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at TIMESTAMPTZ
);
-- The sweeper looks for old open holds.
CREATE INDEX holds_open_by_age ON holds (created_at) WHERE state = 'open';

-- One row per settled request.
CREATE TABLE usage (
    sequence BIGSERIAL NOT NULL UNIQUE,
    request_id TEXT PRIMARY KEY REFERENCES holds (request_id),
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_prefix TEXT NOT NULL,
    model_id TEXT NOT NULL,
    provider_account_id TEXT REFERENCES accounts (id),
    provider_key TEXT NOT NULL,
    node_id TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    cost_micro_usd BIGINT NOT NULL CHECK (cost_micro_usd >= 0),
    provider_earning_micro_usd BIGINT NOT NULL CHECK (provider_earning_micro_usd >= 0),
    platform_fee_micro_usd BIGINT NOT NULL CHECK (platform_fee_micro_usd >= 0),
    outcome TEXT NOT NULL CHECK (outcome IN ('completed', 'consumer_disconnected')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (provider_earning_micro_usd + platform_fee_micro_usd = cost_micro_usd)
);
-- Account history, newest first.
CREATE INDEX usage_by_account ON usage (account_id, sequence DESC);
-- Provider earnings, newest first.
CREATE INDEX usage_by_provider ON usage (provider_account_id, sequence DESC)
    WHERE provider_account_id IS NOT NULL;

CREATE TABLE ledger_entries (
    id BIGSERIAL PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL CHECK (kind IN ('hold', 'release', 'earning', 'credit')),
    reference TEXT NOT NULL,
    amount_micro_usd BIGINT NOT NULL,
    balance_after_micro_usd BIGINT NOT NULL CHECK (balance_after_micro_usd >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (account_id, kind, reference)
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id DESC);
