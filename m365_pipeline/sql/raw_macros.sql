-- Table macros over the raw tables, defined once for the transforms that read them. DuckDB binds a
-- table macro when it is created, so these exist only on connections of transforms run after the
-- raw layer (duckdb_helpers.run_sql(..., raw_macros=True)).

-- Rule 2: the rule-2 accounts (mailboxes of m365 tenants) with their organization (rule 1).
CREATE OR REPLACE TEMP MACRO rule2_accounts() AS TABLE
    SELECT upn_key(a.upn) AS upn, a.name, a.licensed, a.status, o.organization_name
    FROM raw.backup_accounts AS a
    JOIN raw.backup_tenants AS t ON t.owner_id = a.owner_id AND t.id = a.tenant_id AND t.type = 'm365'
    JOIN raw.backup_organizations AS o ON o.id = t.owner_id
    WHERE a.mailbox AND nullif(trim(a.upn), '') IS NOT NULL;
