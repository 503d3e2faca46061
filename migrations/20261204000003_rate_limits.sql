-- Per-account rate limits. NULL means the router's default.
ALTER TABLE accounts
    ADD COLUMN requests_per_minute INTEGER CHECK (requests_per_minute >= 0),
    ADD COLUMN tokens_per_minute INTEGER CHECK (tokens_per_minute >= 0);
