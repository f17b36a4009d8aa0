-- marts.org_license_history: one row per published night, organization and license name (rule 6's, as
-- spelled) with its holders among that night's published users, and those of the license (rule 14: names
-- equal ignoring case are one license, spelled as the first by rule 9) on the row of its first spelling.
-- Rule 14's license figures add these up over a month's days (marts.billing_licenses_all) instead of
-- re-reading every published user of the month. Recorded by the publish step (assets/billing.py) for
-- the night in temp table license_night (d), once the night before it is: that night's holders plus the
-- history rows opened on d, minus those closed on d. A forgotten night's rows go with it
-- (nights.forget_nights). The table is created with the macros that read it (marts_billing.sql).
INSERT INTO marts.org_license_history
SELECT collection_date, organization_name, license_name, users,
       sum(users) OVER license AS license_users, license_name = min(license_name) OVER license AS first_spelling
FROM (
    SELECT (SELECT d FROM license_night) AS collection_date, organization_name, license_name, sum(users) AS users
    FROM (
        SELECT organization_name, license_name, users FROM marts.org_license_history
        WHERE collection_date = (SELECT max(collection_date) FROM marts.nights
                                 WHERE collection_date < (SELECT d FROM license_night))
        UNION ALL
        SELECT organization_name, unnest(string_split(licenses, ', ')), 1 FROM marts.published_users_history
        WHERE licenses <> '' AND valid_from = (SELECT d FROM license_night)
        UNION ALL
        SELECT organization_name, unnest(string_split(licenses, ', ')), -1 FROM marts.published_users_history
        WHERE licenses <> '' AND valid_to = (SELECT d FROM license_night))
    GROUP BY ALL HAVING sum(users) > 0)
WINDOW license AS (PARTITION BY organization_name, lower(license_name));
