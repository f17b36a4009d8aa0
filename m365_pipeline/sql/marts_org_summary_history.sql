-- marts.org_summary_history: one row per organization and published night (rule 11), with the night's
-- backup seats (rule 14: rule-13 rows with status active). Run inside the publish step's transaction (a
-- blocked or failed run leaves no rows); re-running a date replaces it.
CREATE TABLE IF NOT EXISTS marts.org_summary_history (
    collection_date DATE NOT NULL, organization_name VARCHAR NOT NULL,
    es_user_count BIGINT NOT NULL, m365_licensed_user_count BIGINT NOT NULL,
    last_collected TIMESTAMPTZ,
    PRIMARY KEY (collection_date, organization_name));
-- Nights kept before backup seats were recorded have none (null): rule 14 counts them as 0.
ALTER TABLE marts.org_summary_history ADD COLUMN IF NOT EXISTS backup_seats BIGINT;

INSERT INTO marts.org_summary_history
    (collection_date, organization_name, es_user_count, m365_licensed_user_count, last_collected, backup_seats)
SELECT (SELECT collection_date FROM tonight), s.organization_name, s.es_user_count, s.m365_licensed_user_count,
       s.last_collected, coalesce(c.es_users_backed_up + c.backed_up_without_email_license, 0)
FROM marts.org_summary AS s
LEFT JOIN marts.org_backup_coverage AS c USING (organization_name);
