-- marts.nights: one row per published night (docs/RULES.md, rule 11), keyed by collection_date,
-- the UTC date of last_collected. Run inside the publish step's transaction, after
-- marts_org_summary_history.sql and marts_published_users_history.sql; re-running a date replaces it.
CREATE TABLE IF NOT EXISTS marts.nights (
    collection_date DATE PRIMARY KEY, last_collected TIMESTAMPTZ NOT NULL);
INSERT INTO marts.nights SELECT collection_date, last_collected FROM tonight;
