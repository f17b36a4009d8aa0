-- core.backup_coverage: one row per organization and user of rule 13: the organization's published
-- users (rule 7) united with the keys of its rule-2 accounts, with the backup status of those accounts.
CREATE OR REPLACE TABLE core.backup_coverage AS
WITH mailboxes AS (
    SELECT organization_name, upn,
           -- Rule 13: active beats excluded beats available; anything else (null, unknown) is none.
           ['active', 'excluded', 'available', 'none'][
               min(CASE status WHEN 'active' THEN 1 WHEN 'excluded' THEN 2 WHEN 'available' THEN 3 ELSE 4 END)]
               AS backup_status,
           count(*)::INTEGER AS backup_accounts,
           min(status) FILTER (WHERE status NOT IN ('active', 'excluded', 'available')) AS unknown_status
    FROM (SELECT organization_name, upn, backup_status_key(status) AS status FROM rule2_accounts())
    GROUP BY organization_name, upn
),
-- Rule 3 gives a key with mailboxes in one organization to that organization, so nearly every mailbox
-- meets its user on (organization, key) in one join; only the rest look their user up by key below.
joined AS MATERIALIZED (
    SELECT coalesce(u.organization_name, m.organization_name) AS organization_name,
           coalesce(u.user_principal_name, m.upn) AS user_principal_name,
           u.display_name,
           coalesce(u.published, false) AS m365_licensed,
           coalesce(u.published AND u.has_email_license, false) AS has_email_license,
           coalesce(m.backup_status, 'none') AS backup_status,
           coalesce(m.backup_accounts, 0)::INTEGER AS backup_accounts,
           m.unknown_status,
           u.organization_name AS published_organization
    FROM core.users AS u
    FULL OUTER JOIN mailboxes AS m ON m.organization_name = u.organization_name AND m.upn = u.user_principal_name
    WHERE u.published OR m.upn IS NOT NULL
)
SELECT * FROM joined WHERE display_name IS NOT NULL  -- core.users.display_name is never null
UNION ALL
-- A mailbox in an organization other than its user's (rule 3): not published here.
SELECT j.organization_name, j.user_principal_name, u.display_name, j.m365_licensed, j.has_email_license,
       j.backup_status, j.backup_accounts, j.unknown_status, u.organization_name
FROM joined AS j
JOIN core.users AS u ON u.user_principal_name = j.user_principal_name
WHERE j.display_name IS NULL;
