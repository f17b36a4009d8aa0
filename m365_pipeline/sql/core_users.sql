-- core.users: one row per user, keyed by the trimmed, lower-cased UPN. Contract rules 2, 3, 6, 7.
CREATE OR REPLACE TABLE core.users AS
WITH owners AS (
    SELECT id AS owner_id, organization_name FROM raw.backup_organizations
),
m365_tenants AS (
    SELECT t.owner_id, t.id AS tenant_id, domain_key(t.domain) AS domain, o.organization_name
    FROM raw.backup_tenants AS t
    JOIN owners AS o ON o.owner_id = t.owner_id
    WHERE t.type = 'm365'
),
-- Rule 2: mailboxes of m365 tenants (public folders and GWS never count), one row per organization and key.
accounts AS (
    SELECT user_principal_name AS upn, name, licensed, organization_name FROM core.backup_accounts
),
-- Rule 3: an organization owns its m365 tenants' domains and its mailboxes' UPN domains.
domain_owners AS (
    SELECT domain, organization_name FROM m365_tenants WHERE domain <> ''
    UNION
    SELECT upn_domain(upn), organization_name FROM accounts
),
sole_domain_owner AS (
    SELECT domain, min(organization_name) AS organization_name
    FROM domain_owners
    WHERE domain <> ''
    GROUP BY domain
    HAVING count(*) = 1
),
-- Whether the organization has an m365 tenant with the UPN's own domain (any of its tenants).
org_tenant_domains AS (
    SELECT DISTINCT organization_name, domain FROM m365_tenants
),
account_orgs AS (
    SELECT a.upn, a.organization_name, d.domain IS NOT NULL AS tenant_has_domain
    FROM accounts AS a
    LEFT JOIN org_tenant_domains AS d
        ON d.organization_name = a.organization_name AND d.domain = upn_domain(a.upn)
),
account_ranked AS (
    SELECT *,
           count(*) OVER (PARTITION BY upn) AS n_orgs,
           sum(tenant_has_domain::INTEGER) OVER (PARTITION BY upn) AS n_with_domain
    FROM account_orgs
),
-- Several organizations: the one whose m365 tenant has the UPN's domain, else the first by name.
account_choice AS (
    SELECT upn, organization_name, n_orgs
    FROM account_ranked
    QUALIFY row_number() OVER (
        PARTITION BY upn
        ORDER BY (n_with_domain = 1 AND tenant_has_domain) DESC, lower(organization_name), organization_name
    ) = 1
),
account_summary AS (
    SELECT upn,
           bool_or(licensed) AS licensed,
           first(name ORDER BY lower(name), name) FILTER (WHERE name IS NOT NULL) AS name
    FROM accounts
    GROUP BY upn
),
saas AS (
    SELECT saas_upn(username, email) AS upn,
           first(trim(display_name) ORDER BY lower(trim(display_name)), trim(display_name))
               FILTER (WHERE nullif(trim(display_name), '') IS NOT NULL) AS display_name
    FROM raw.saas_users
    WHERE nullif(saas_upn(username, email), '') IS NOT NULL
    GROUP BY 1
),
licenses AS (
    SELECT user_principal_name AS upn,
           coalesce(string_agg(license_name, ', ' ORDER BY lower(license_name), license_name)
                        FILTER (WHERE is_m365_license), '') AS licenses,
           bool_or(is_m365_license) AS m365,
           bool_or(is_email_license) AS email
    FROM core.license_assignments
    GROUP BY user_principal_name
),
keys AS (
    SELECT upn FROM accounts UNION SELECT upn FROM saas
),
resolved AS (
    SELECT k.upn AS user_principal_name,
           coalesce(c.organization_name, d.organization_name) AS organization_name,
           CASE WHEN c.organization_name IS NOT NULL THEN 'backup_account'
                WHEN d.organization_name IS NOT NULL THEN 'domain' END AS organization_source,
           coalesce(s.display_name, b.name, k.upn) AS display_name,
           coalesce(l.licenses, '') AS licenses,
           -- Rule 6: source S decides for every user it knows; source B stands in otherwise.
           CASE WHEN s.upn IS NOT NULL THEN coalesce(l.m365, false) ELSE coalesce(b.licensed, false) END
               AS m365_licensed,
           CASE WHEN s.upn IS NOT NULL THEN coalesce(l.email, false) ELSE coalesce(b.licensed, false) END
               AS has_email_license,
           CASE WHEN s.upn IS NOT NULL THEN 'saas' ELSE 'backup' END AS classification_source,
           s.upn IS NOT NULL AS known_to_saas,
           b.upn IS NOT NULL AS known_to_backup,
           coalesce(c.n_orgs, 0)::INTEGER AS account_organizations
    FROM keys AS k
    LEFT JOIN account_choice AS c ON c.upn = k.upn
    LEFT JOIN sole_domain_owner AS d ON d.domain = upn_domain(k.upn)
    LEFT JOIN account_summary AS b ON b.upn = k.upn
    LEFT JOIN saas AS s ON s.upn = k.upn
    LEFT JOIN licenses AS l ON l.upn = k.upn
)
SELECT *, organization_name IS NOT NULL AND m365_licensed AS published
FROM resolved
ORDER BY organization_name NULLS LAST, user_principal_name;
