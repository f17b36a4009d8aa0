-- marts.org_backup_coverage: one row per organization of the summary (rule 1, in its order), with
-- rule 13's coverage counts.
CREATE OR REPLACE TABLE marts.org_backup_coverage AS
WITH counts AS (
    SELECT organization_name,
           count(*) FILTER (WHERE has_email_license) AS es_user_count,
           count(*) FILTER (WHERE has_email_license AND backup_status = 'active') AS es_users_backed_up,
           count(*) FILTER (WHERE has_email_license AND backup_status <> 'active') AS es_users_not_backed_up,
           count(*) FILTER (WHERE NOT has_email_license AND backup_status = 'active')
               AS backed_up_without_email_license
    FROM core.backup_coverage
    GROUP BY organization_name
)
SELECT s.organization_name,
       coalesce(c.es_user_count, 0)::BIGINT AS es_user_count,
       coalesce(c.es_users_backed_up, 0)::BIGINT AS es_users_backed_up,
       coalesce(c.es_users_not_backed_up, 0)::BIGINT AS es_users_not_backed_up,
       coalesce(c.backed_up_without_email_license, 0)::BIGINT AS backed_up_without_email_license
FROM marts.org_summary AS s
LEFT JOIN counts AS c ON c.organization_name = s.organization_name
ORDER BY lower(s.organization_name), s.organization_name;
