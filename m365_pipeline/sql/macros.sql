-- Rules shared by several transforms, defined once (docs/RULES.md). Each transform's connection
-- runs this file first (duckdb_helpers.run_sql); the macros are temporary, so nothing is stored.

-- Rule 2: a user's key is the trimmed, lower-cased UPN.
CREATE OR REPLACE TEMP MACRO upn_key(upn) AS lower(trim(upn));
-- Rule 2: a source S user's UPN is username, or email when username is empty or null.
CREATE OR REPLACE TEMP MACRO saas_upn(username, email) AS upn_key(coalesce(nullif(trim(username), ''), email));
-- Rule 3: the domain part of a UPN key; domains compare exactly, lower-cased.
CREATE OR REPLACE TEMP MACRO upn_domain(upn) AS regexp_extract(upn, '@([^@]+)$', 1);
CREATE OR REPLACE TEMP MACRO domain_key(domain) AS lower(trim(domain));
-- Rule 13: a source B status compared after trimming whitespace, case-insensitively.
CREATE OR REPLACE TEMP MACRO backup_status_key(status) AS
    nullif(lower(trim(status, ' ' || chr(9) || chr(10) || chr(13))), '');
-- Rule 2: the rule-2 accounts (mailboxes of m365 tenants) with their organization (rule 1).
CREATE OR REPLACE TEMP MACRO rule2_accounts() AS TABLE
    SELECT upn_key(a.upn) AS upn, a.name, a.licensed, a.status, o.organization_name
    FROM raw.backup_accounts AS a
    JOIN raw.backup_tenants AS t ON t.owner_id = a.owner_id AND t.id = a.tenant_id AND t.type = 'm365'
    JOIN raw.backup_organizations AS o ON o.id = t.owner_id
    WHERE a.mailbox AND nullif(trim(a.upn), '') IS NOT NULL;
