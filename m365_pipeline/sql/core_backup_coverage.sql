-- core.backup_coverage: one row per organization and user of rule 13: the organization's published
-- users (rule 7) united with the keys of its rule-2 accounts, with the backup status of those accounts.
CREATE OR REPLACE TABLE core.backup_coverage AS
WITH mailboxes AS (
    SELECT organization_name, upn,
           -- Rule 13: active beats excluded beats available; anything else (null, unknown) is none.
           CASE WHEN bool_or(status = 'active') THEN 'active'
                WHEN bool_or(status = 'excluded') THEN 'excluded'
                WHEN bool_or(status = 'available') THEN 'available'
                ELSE 'none' END AS backup_status,
           count(*)::INTEGER AS backup_accounts,
           string_agg(DISTINCT status, ', ' ORDER BY status)
               FILTER (WHERE status NOT IN ('active', 'excluded', 'available')) AS unknown_statuses
    FROM (SELECT organization_name, upn, backup_status_key(status) AS status FROM rule2_accounts())
    GROUP BY organization_name, upn
),
published AS (
    SELECT organization_name, user_principal_name AS upn, has_email_license
    FROM core.users
    WHERE published
),
rows AS (
    SELECT coalesce(p.organization_name, m.organization_name) AS organization_name,
           coalesce(p.upn, m.upn) AS user_principal_name,
           p.upn IS NOT NULL AS m365_licensed,
           coalesce(p.has_email_license, false) AS has_email_license,
           coalesce(m.backup_status, 'none') AS backup_status,
           coalesce(m.backup_accounts, 0)::INTEGER AS backup_accounts,
           m.unknown_statuses
    FROM published AS p
    FULL OUTER JOIN mailboxes AS m ON m.organization_name = p.organization_name AND m.upn = p.upn
)
SELECT r.organization_name, r.user_principal_name,
       u.display_name,  -- rule 7's display name, the same in every organization
       r.m365_licensed, r.has_email_license, r.backup_status, r.backup_accounts, r.unknown_statuses,
       u.organization_name AS published_organization
FROM rows AS r
JOIN core.users AS u ON u.user_principal_name = r.user_principal_name
ORDER BY lower(r.organization_name), r.organization_name, lower(r.user_principal_name), r.user_principal_name;
