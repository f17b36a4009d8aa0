-- marts.org_summary_history: one row per organization and published night (rule 11). Run inside the
-- publish step's transaction (a blocked or failed run leaves no rows); re-running a date replaces it.
CREATE TABLE IF NOT EXISTS marts.org_summary_history (
    collection_date DATE NOT NULL, organization_name VARCHAR NOT NULL,
    es_user_count BIGINT NOT NULL, m365_licensed_user_count BIGINT NOT NULL,
    last_collected TIMESTAMPTZ,
    PRIMARY KEY (collection_date, organization_name));

INSERT INTO marts.org_summary_history
SELECT (SELECT collection_date FROM tonight), organization_name, es_user_count, m365_licensed_user_count,
       last_collected
FROM marts.org_summary;
