-- Rules 11 and 12 as stored macros over marts.published_users_history, defined once: run after
-- marts_published_users_history.sql when a night is recorded (so analytics.duckdb carries them too),
-- and by m365-serve on each published version's copy of that table (history_api.changes_database),
-- which answers /api/m365/changes with marts.changes_between.

-- published_users_on(d): the users published on the latest kept night dated on or before d.
CREATE OR REPLACE MACRO marts.published_users_on(d) AS TABLE
SELECT organization_name, user_principal_name, display_name, licenses, has_email_license
FROM marts.published_users_history
WHERE valid_from <= d::DATE AND (valid_to IS NULL OR valid_to > d::DATE);

-- Rule 12: changes_between(a, b), from the night on or before a to the night on or before b (a <= b),
-- one row per changed UPN, in rule 12's order. Only UPNs with a row opened or closed in (a, b] can
-- have changed, so the work grows with the changes, not with the users.
CREATE OR REPLACE MACRO marts.changes_between(a, b) AS TABLE
WITH touched AS (
    SELECT DISTINCT user_principal_name FROM marts.published_users_history
    WHERE (valid_from > a::DATE AND valid_from <= b::DATE) OR (valid_to > a::DATE AND valid_to <= b::DATE)
),
before AS (
    SELECT * FROM marts.published_users_on(a) SEMI JOIN touched USING (user_principal_name)
),
after AS (
    SELECT * FROM marts.published_users_on(b) SEMI JOIN touched USING (user_principal_name)
),
classified AS (
    SELECT coalesce(n.organization_name, o.organization_name) AS organization_name,
           CASE WHEN o.user_principal_name IS NOT NULL AND n.user_principal_name IS NOT NULL
                     AND o.organization_name <> n.organization_name THEN o.organization_name END
               AS previous_organization_name,
           coalesce(n.user_principal_name, o.user_principal_name) AS user_principal_name,
           coalesce(n.display_name, o.display_name) AS display_name,
           CASE WHEN o.user_principal_name IS NULL THEN 'added'
                WHEN n.user_principal_name IS NULL THEN 'removed'
                WHEN o.organization_name <> n.organization_name THEN 'moved'
                WHEN NOT o.has_email_license AND n.has_email_license THEN 'email_gained'
                WHEN o.has_email_license AND NOT n.has_email_license THEN 'email_lost'
                WHEN o.licenses <> n.licenses THEN 'licenses_changed'
           END AS change,
           o.licenses AS licenses_before, n.licenses AS licenses_after,
           o.has_email_license AS has_email_license_before, n.has_email_license AS has_email_license_after
    FROM before AS o FULL OUTER JOIN after AS n ON n.user_principal_name = o.user_principal_name
)
SELECT * FROM classified WHERE change IS NOT NULL
ORDER BY lower(organization_name), organization_name, lower(user_principal_name), user_principal_name;
