-- Batched holds and settlements: a node sends every hold or settlement that is
-- waiting in one call, so that many share one round trip and one commit.
--
-- Each batch first locks the accounts it touches in id order. Batches from
-- different connections then take their account locks in the same order and
-- cannot deadlock on them; hold rows are distinct per request.

-- The per-hold history index is not used by any query.
DROP INDEX holds_open_by_account;

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

-- Releases take the account lock before the hold lock, as the batches do, so a
-- release racing a settlement of the same request waits instead of deadlocking.
CREATE OR REPLACE FUNCTION switchyard_release_hold(p_request_id TEXT) RETURNS TEXT
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
