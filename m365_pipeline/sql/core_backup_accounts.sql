-- core.backup_accounts: one row per organization and user key of source B's rule-2 accounts (mailboxes
-- of m365 tenants; the organization by rule 1), several accounts with one key folded into one row.
-- Read and normalised here once, for core.users (rules 3 and 6) and core.backup_coverage (rule 13).
CREATE OR REPLACE TABLE core.backup_accounts AS
WITH accounts AS (
    SELECT o.organization_name, upn_key(a.upn) AS user_principal_name, nullif(trim(a.name), '') AS name,
           a.licensed, backup_status_key(a.status) AS status
    FROM raw.backup_accounts AS a
    JOIN raw.backup_tenants AS t ON t.owner_id = a.owner_id AND t.id = a.tenant_id AND t.type = 'm365'
    JOIN raw.backup_organizations AS o ON o.id = t.owner_id
    WHERE a.mailbox AND nullif(trim(a.upn), '') IS NOT NULL
)
SELECT organization_name, user_principal_name,
       first(name ORDER BY lower(name), name) FILTER (WHERE name IS NOT NULL) AS name,
       coalesce(bool_or(licensed), false) AS licensed,
       -- Rule 13: active beats excluded beats available; anything else (null, unknown) is none.
       ['active', 'excluded', 'available', 'none'][
           min(CASE status WHEN 'active' THEN 1 WHEN 'excluded' THEN 2 WHEN 'available' THEN 3 ELSE 4 END)]
           AS backup_status,
       min(status) FILTER (WHERE status NOT IN ('active', 'excluded', 'available')) AS unknown_status,
       count(*)::INTEGER AS accounts
FROM accounts
GROUP BY organization_name, user_principal_name;
