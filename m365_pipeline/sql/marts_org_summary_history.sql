-- marts.org_summary_history: one row per organization and collection date (the UTC date of
-- last_collected). Re-running a date replaces that date's rows, in one transaction.
CREATE TABLE IF NOT EXISTS marts.org_summary_history (
    collection_date DATE NOT NULL, organization_name VARCHAR NOT NULL,
    es_user_count BIGINT NOT NULL, m365_licensed_user_count BIGINT NOT NULL,
    last_collected TIMESTAMPTZ,
    PRIMARY KEY (collection_date, organization_name));

BEGIN TRANSACTION;
DELETE FROM marts.org_summary_history
WHERE collection_date = (SELECT (min(last_collected) AT TIME ZONE 'UTC')::DATE FROM marts.org_summary);
INSERT INTO marts.org_summary_history
SELECT (last_collected AT TIME ZONE 'UTC')::DATE, organization_name, es_user_count, m365_licensed_user_count,
       last_collected
FROM marts.org_summary;
COMMIT;
