-- marts.org_summary: one row per organization (rule 1), counts of published users (rules 7, 8).
-- $1 = last_collected (when the run's pulls started).
CREATE OR REPLACE TABLE marts.org_summary AS
WITH organizations AS (
    SELECT DISTINCT organization_name FROM raw.backup_organizations
),
counts AS (
    SELECT organization_name,
           count(*) FILTER (WHERE has_email_license) AS es_user_count,
           count(*) AS m365_licensed_user_count
    FROM core.users
    WHERE published
    GROUP BY organization_name
)
SELECT o.organization_name,
       coalesce(c.es_user_count, 0)::BIGINT AS es_user_count,
       coalesce(c.m365_licensed_user_count, 0)::BIGINT AS m365_licensed_user_count,
       $1::TIMESTAMPTZ AS last_collected
FROM organizations AS o
LEFT JOIN counts AS c ON c.organization_name = o.organization_name
ORDER BY lower(o.organization_name), o.organization_name;
