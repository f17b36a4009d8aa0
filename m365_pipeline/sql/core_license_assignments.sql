-- core.license_assignments: one row per user and distinct license (case-insensitive).
-- Contract rules 4 and 5. Rules are evaluated once per distinct (name, vendor) pair,
-- not per subscription: there are dozens of those, against millions of subscriptions.
CREATE OR REPLACE TABLE core.license_assignments AS
WITH saas_users AS (
    SELECT id AS saas_user_id,
           saas_upn(username, email) AS user_principal_name
    FROM raw.saas_users
),
subscriptions AS (
    SELECT u.user_principal_name,
           CASE WHEN nullif(trim(s.application_name), '') IS NOT NULL THEN s.application_name ELSE s.name END
               AS license_name,
           coalesce(s.vendor, '') AS vendor
    FROM raw.saas_user_subscriptions AS s
    JOIN saas_users AS u ON u.saas_user_id = s.user_id
    WHERE nullif(u.user_principal_name, '') IS NOT NULL
),
named AS (
    SELECT * FROM subscriptions WHERE nullif(trim(license_name), '') IS NOT NULL
),
products AS (
    SELECT DISTINCT license_name, vendor FROM named
),
evaluated AS (
    SELECT p.license_name, p.vendor, r.rule_id, r.rule_order, r.applies_to, r.effect,
           lower(CASE r.field WHEN 'vendor' THEN p.vendor ELSE p.license_name END)
               LIKE lower(r.like_pattern) ESCAPE '\' AS hit
    FROM products AS p CROSS JOIN core.license_rules AS r
),
verdicts AS (
    SELECT license_name, vendor,
           first(rule_id ORDER BY rule_order) FILTER (WHERE applies_to = 'm365' AND effect = 'require' AND NOT hit)
               AS failed_require,
           first(rule_id ORDER BY rule_order) FILTER (WHERE applies_to = 'm365' AND effect = 'exclude' AND hit)
               AS m365_exclude,
           string_agg(rule_id, ' + ' ORDER BY rule_order) FILTER (WHERE applies_to = 'm365' AND effect = 'require')
               AS requires,
           first(rule_id ORDER BY rule_order) FILTER (WHERE applies_to = 'email' AND effect = 'exclude' AND hit)
               AS email_exclude,
           first(rule_id ORDER BY rule_order) FILTER (WHERE applies_to = 'email' AND effect = 'include' AND hit)
               AS email_include
    FROM evaluated
    GROUP BY license_name, vendor
),
classified AS (
    SELECT license_name, vendor,
           failed_require IS NULL AND m365_exclude IS NULL AS is_m365,
           coalesce(failed_require, m365_exclude, requires) AS m365_rule,
           email_exclude, email_include
    FROM verdicts
),
per_subscription AS (
    SELECT n.user_principal_name, n.license_name, n.vendor, c.is_m365, c.m365_rule,
           c.is_m365 AND c.email_exclude IS NULL AND c.email_include IS NOT NULL AS is_email,
           CASE WHEN c.is_m365 THEN coalesce(c.email_exclude, c.email_include) END AS email_rule
    FROM named AS n JOIN classified AS c USING (license_name, vendor)
)
SELECT user_principal_name,
       -- Names equal ignoring case count once, spelled as the first by rule 9's order
       -- among the M365 ones (the spelling the dashboard shows).
       coalesce(min(license_name) FILTER (WHERE is_m365), min(license_name)) AS license_name,
       first(vendor ORDER BY is_m365 DESC, vendor) AS vendor,
       bool_or(is_m365) AS is_m365_license,
       bool_or(is_email) AS is_email_license,
       first(m365_rule ORDER BY is_m365 DESC, license_name) AS m365_rule,
       first(email_rule ORDER BY is_email DESC, email_rule NULLS LAST) AS email_rule
FROM per_subscription
GROUP BY user_principal_name, lower(license_name)
ORDER BY user_principal_name, lower(license_name), license_name;
