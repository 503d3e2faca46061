-- Holds, settlements and releases as functions, so that each is one round trip
-- and one implicit transaction instead of a conversation of statements, and
-- batch versions that handle many in one call. They implement the same rules as
-- the in-memory ledger, and the contract tests check both against the same
-- amounts.

-- Places a hold: a conditional debit of the account's available balance.
-- Returns 'ok', 'duplicate' (a hold with this id exists), 'no_account' or
-- 'insufficient', with the available balance for the last.
CREATE FUNCTION switchyard_place_hold(
    p_request_id TEXT,
    p_account_id TEXT,
    p_key_prefix TEXT,
    p_amount BIGINT,
    p_node_id TEXT,
    OUT outcome TEXT,
    OUT available BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_balance BIGINT;
BEGIN
    INSERT INTO holds (request_id, account_id, key_prefix, amount_micro_usd, node_id)
    SELECT p_request_id, p_account_id, p_key_prefix, p_amount, p_node_id
    WHERE EXISTS (SELECT 1 FROM accounts WHERE id = p_account_id)
    ON CONFLICT (request_id) DO NOTHING;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM holds WHERE request_id = p_request_id) THEN
            outcome := 'duplicate';
        ELSE
            outcome := 'no_account';
        END IF;
        RETURN;
    END IF;

    UPDATE accounts
    SET balance_micro_usd = balance_micro_usd - p_amount,
        held_micro_usd = held_micro_usd + p_amount
    WHERE id = p_account_id AND balance_micro_usd >= p_amount
    RETURNING balance_micro_usd INTO v_balance;
    IF NOT FOUND THEN
        -- Undo the hold row; the function's statement is one transaction, so
        -- nothing of this call remains.
        DELETE FROM holds WHERE request_id = p_request_id;
        SELECT balance_micro_usd INTO available FROM accounts WHERE id = p_account_id;
        outcome := 'insufficient';
        RETURN;
    END IF;

    INSERT INTO ledger_entries (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
    VALUES (p_account_id, 'hold', p_request_id, -p_amount, v_balance);
    outcome := 'ok';
    available := v_balance;
END;
$$;

-- Releases an open hold in full. Returns 'released', 'closed' (already settled
-- or released: nothing changes) or 'not_found'. It locks the account before the
-- hold, as the batch functions do, so a release racing a settlement of the same
-- request waits instead of deadlocking.
CREATE FUNCTION switchyard_release_hold(p_request_id TEXT) RETURNS TEXT
LANGUAGE plpgsql AS $$
DECLARE
    v_hold holds%ROWTYPE;
    v_balance BIGINT;
BEGIN
    PERFORM 1 FROM accounts
    WHERE id = (SELECT account_id FROM holds WHERE request_id = p_request_id)
    FOR UPDATE;

    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_hold.state <> 'open' THEN
        RETURN 'closed';
    END IF;

    UPDATE holds SET state = 'released', closed_at = now() WHERE request_id = p_request_id;
    UPDATE accounts
    SET balance_micro_usd = balance_micro_usd + v_hold.amount_micro_usd,
        held_micro_usd = held_micro_usd - v_hold.amount_micro_usd
    WHERE id = v_hold.account_id
    RETURNING balance_micro_usd INTO v_balance;
    INSERT INTO ledger_entries (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
    VALUES (v_hold.account_id, 'release', p_request_id, v_hold.amount_micro_usd, v_balance);
    RETURN 'released';
END;
$$;

-- Settles a held request: charges min(cost, hold), releases the rest, credits the
-- provider's account (if it exists) with the charge minus the platform fee
-- (floor(charge × fee_bps / 10000), at most the whole charge), and records the
-- usage row, all at once. A settled request returns its first result; a released
-- one returns a zero charge. Outcome is 'settled', 'repeated', 'released' or
-- 'not_found'.
CREATE FUNCTION switchyard_settle(
    p_request_id TEXT,
    p_cost BIGINT,
    p_fee_bps INTEGER,
    p_provider_account_id TEXT,
    p_provider_key TEXT,
    p_node_id TEXT,
    p_model_id TEXT,
    p_prompt_tokens BIGINT,
    p_completion_tokens BIGINT,
    p_outcome TEXT,
    OUT outcome TEXT,
    OUT hold_amount BIGINT,
    OUT charged BIGINT,
    OUT provider_earning BIGINT,
    OUT platform_fee BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_hold holds%ROWTYPE;
    v_provider TEXT;
    v_balance BIGINT;
BEGIN
    SELECT * INTO v_hold FROM holds WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN;
    END IF;
    hold_amount := v_hold.amount_micro_usd;

    IF v_hold.state = 'settled' THEN
        SELECT u.cost_micro_usd, u.provider_earning_micro_usd, u.platform_fee_micro_usd
        INTO charged, provider_earning, platform_fee
        FROM usage u WHERE u.request_id = p_request_id;
        outcome := 'repeated';
        RETURN;
    END IF;
    IF v_hold.state = 'released' THEN
        charged := 0;
        provider_earning := 0;
        platform_fee := 0;
        outcome := 'released';
        RETURN;
    END IF;

    charged := greatest(least(p_cost, v_hold.amount_micro_usd), 0);
    SELECT id INTO v_provider FROM accounts WHERE id = p_provider_account_id;
    IF v_provider IS NULL THEN
        provider_earning := 0;
        platform_fee := charged;
    ELSE
        platform_fee := charged * least(greatest(p_fee_bps, 0), 10000) / 10000;
        provider_earning := charged - platform_fee;
    END IF;

    UPDATE holds SET state = 'settled', closed_at = now() WHERE request_id = p_request_id;

    UPDATE accounts
    SET balance_micro_usd = balance_micro_usd + (v_hold.amount_micro_usd - charged),
        held_micro_usd = held_micro_usd - v_hold.amount_micro_usd
    WHERE id = v_hold.account_id
    RETURNING balance_micro_usd INTO v_balance;
    INSERT INTO ledger_entries (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
    VALUES (v_hold.account_id, 'release', p_request_id, v_hold.amount_micro_usd - charged, v_balance);

    IF v_provider IS NOT NULL THEN
        UPDATE accounts
        SET balance_micro_usd = balance_micro_usd + provider_earning,
            earnings_micro_usd = earnings_micro_usd + provider_earning
        WHERE id = v_provider
        RETURNING balance_micro_usd INTO v_balance;
        INSERT INTO ledger_entries (account_id, kind, reference, amount_micro_usd, balance_after_micro_usd)
        VALUES (v_provider, 'earning', p_request_id, provider_earning, v_balance);
    END IF;

    INSERT INTO usage (request_id, account_id, key_prefix, model_id, provider_account_id,
                       provider_key, node_id, prompt_tokens, completion_tokens,
                       cost_micro_usd, provider_earning_micro_usd, platform_fee_micro_usd, outcome)
    VALUES (p_request_id, v_hold.account_id, v_hold.key_prefix, p_model_id, v_provider,
            p_provider_key, p_node_id, p_prompt_tokens, p_completion_tokens,
            charged, provider_earning, platform_fee, p_outcome);
    outcome := 'settled';
END;
$$;

-- Batched holds and settlements: a node sends every hold or settlement that is
-- waiting in one call, so that many share one round trip and one commit.
--
-- Each batch first locks the accounts it touches in id order. Batches from
-- different connections then take their account locks in the same order and
-- cannot deadlock on them; hold rows are distinct per request.

CREATE FUNCTION switchyard_place_hold_batch(
    p_request_ids TEXT[],
    p_account_ids TEXT[],
    p_key_prefixes TEXT[],
    p_amounts BIGINT[],
    p_node_ids TEXT[]
) RETURNS TABLE (item INTEGER, outcome TEXT, available BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_result RECORD;
BEGIN
    PERFORM 1 FROM accounts
    WHERE id = ANY (p_account_ids)
    ORDER BY id
    FOR UPDATE;

    FOR i IN 1 .. coalesce(array_length(p_request_ids, 1), 0) LOOP
        SELECT * INTO v_result
        FROM switchyard_place_hold(p_request_ids[i], p_account_ids[i], p_key_prefixes[i], p_amounts[i], p_node_ids[i]);
        item := i;
        outcome := v_result.outcome;
        available := v_result.available;
        RETURN NEXT;
    END LOOP;
END;
$$;

CREATE FUNCTION switchyard_settle_batch(
    p_request_ids TEXT[],
    p_costs BIGINT[],
    p_fee_bps INTEGER[],
    p_provider_account_ids TEXT[],
    p_provider_keys TEXT[],
    p_node_ids TEXT[],
    p_model_ids TEXT[],
    p_prompt_tokens BIGINT[],
    p_completion_tokens BIGINT[],
    p_outcomes TEXT[]
) RETURNS TABLE (
    item INTEGER,
    outcome TEXT,
    hold_amount BIGINT,
    charged BIGINT,
    provider_earning BIGINT,
    platform_fee BIGINT
)
LANGUAGE plpgsql AS $$
DECLARE
    v_result RECORD;
BEGIN
    PERFORM 1 FROM accounts
    WHERE id IN (
        SELECT h.account_id FROM holds h WHERE h.request_id = ANY (p_request_ids)
        UNION
        SELECT unnest(p_provider_account_ids)
    )
    ORDER BY id
    FOR UPDATE;

    FOR i IN 1 .. coalesce(array_length(p_request_ids, 1), 0) LOOP
        SELECT * INTO v_result
        FROM switchyard_settle(p_request_ids[i], p_costs[i], p_fee_bps[i], p_provider_account_ids[i],
                               p_provider_keys[i], p_node_ids[i], p_model_ids[i], p_prompt_tokens[i],
                               p_completion_tokens[i], p_outcomes[i]);
        item := i;
        outcome := v_result.outcome;
        hold_amount := v_result.hold_amount;
        charged := v_result.charged;
        provider_earning := v_result.provider_earning;
        platform_fee := v_result.platform_fee;
        RETURN NEXT;
    END LOOP;
END;
$$;
