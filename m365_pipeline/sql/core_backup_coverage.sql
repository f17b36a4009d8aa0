-- core.backup_coverage: one row per organization and user of rule 13: the organization's published
-- users (rule 7) united with the keys of its rule-2 accounts, with the backup status of those accounts.
-- Rule 3 gives a key with rule-2 accounts an organization among its accounts' organizations, so a
-- published user with a mailbox anywhere has one in its own organization: one join on the key finds
-- every row (each organization of the key's mailboxes; its own organization when it has none).
CREATE OR REPLACE TABLE core.backup_coverage AS
WITH rows AS (
    SELECT coalesce(m.organization_name, u.organization_name) AS organization_name,
           u.user_principal_name,
           u.display_name,
           -- Published in this organization (rule 7); a mailbox elsewhere is a row with false.
           u.published AND (m.organization_name IS NULL OR m.organization_name = u.organization_name)
               AS m365_licensed,
           u.has_email_license,
           coalesce(m.backup_status, 'none') AS backup_status,
           coalesce(m.accounts, 0)::INTEGER AS backup_accounts,
           m.unknown_status,
           u.organization_name AS published_organization
    FROM core.users AS u
    LEFT JOIN core.backup_accounts AS m ON m.user_principal_name = u.user_principal_name
    WHERE u.published OR m.user_principal_name IS NOT NULL
)
SELECT organization_name, user_principal_name, display_name, m365_licensed,
       m365_licensed AND has_email_license AS has_email_license, backup_status, backup_accounts,
       unknown_status, published_organization
FROM rows;
