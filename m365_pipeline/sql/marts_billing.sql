-- Rules 14 and 15 (billing months) as stored macros over the kept nights, defined once: run when a
-- night is recorded (so analytics.duckdb carries them too). `month` is 'YYYY-MM'. Every figure is
-- over the days of the month: all its calendar days once a later night is kept (closed), else day 1
-- to its latest night; the count in force on a day is that of the latest kept night on or before it.

-- marts.org_license_history: each night's holders of each license (marts_org_license_history.sql records it).
CREATE TABLE IF NOT EXISTS marts.org_license_history (
    collection_date DATE NOT NULL, organization_name VARCHAR NOT NULL, license_name VARCHAR NOT NULL,
    users BIGINT NOT NULL, license_users BIGINT NOT NULL, first_spelling BOOLEAN NOT NULL);

-- billing_days(month): one row per day of the month, with the night in force on it (null: none yet).
CREATE OR REPLACE MACRO marts.billing_days(month) AS TABLE
WITH bounds AS (
    SELECT first_day, last_day(first_day) AS month_end,
           (SELECT max(collection_date) FROM marts.nights
            WHERE collection_date BETWEEN first_day AND last_day(first_day)) AS latest,
           (SELECT count(*) > 0 FROM marts.nights WHERE collection_date > last_day(first_day)) AS closed
    FROM (SELECT CAST(month || '-01' AS DATE) AS first_day)
),
days AS (
    SELECT CAST(d AS DATE) AS day, closed
    FROM bounds, range(CAST(first_day AS TIMESTAMP),
                       CAST(CASE WHEN closed THEN month_end ELSE latest END AS TIMESTAMP) + INTERVAL 1 DAY,
                       INTERVAL 1 DAY) AS t(d)
    WHERE latest IS NOT NULL
)
SELECT days.day, days.closed, n.collection_date AS night
FROM days ASOF LEFT JOIN marts.nights AS n ON days.day >= n.collection_date;

-- billing_month_header(month): the month's nights, first and last night, days, and whether it is closed.
CREATE OR REPLACE MACRO marts.billing_month_header(month) AS TABLE
SELECT any_value(closed) AS closed,
       (SELECT count(*) FROM marts.nights WHERE strftime(collection_date, '%Y-%m') = month) AS nights,
       (SELECT min(collection_date) FROM marts.nights WHERE strftime(collection_date, '%Y-%m') = month)
           AS first_night,
       (SELECT max(collection_date) FROM marts.nights WHERE strftime(collection_date, '%Y-%m') = month)
           AS last_night,
       count(*) AS days
FROM marts.billing_days(month);

-- The average: seat-days over days, rounded half up to hundredths in integers ((200 s + d) // 2d), so it is
-- exact (a DECIMAL) and the totals of averages are exact sums too.
CREATE OR REPLACE MACRO marts.billing_average(seat_days, days) AS
    CAST(((200 * seat_days + days) // (2 * days)) / 100 AS DECIMAL(18, 2));

-- billing_month(month): one row per organization of the month's report (rule 14), in rule 9's order.
CREATE OR REPLACE MACRO marts.billing_month(month) AS TABLE
WITH days AS (SELECT * FROM marts.billing_days(month)),
n_days AS (SELECT count(*) AS n, max(day) AS last_day FROM days),
in_force AS (
    SELECT d.day, h.organization_name, h.es_user_count AS es, h.m365_licensed_user_count AS m365,
           coalesce(h.backup_seats, 0) AS seats
    FROM days AS d JOIN marts.org_summary_history AS h ON h.collection_date = d.night
),
present AS (
    SELECT organization_name, count(*) AS nights FROM marts.org_summary_history
    WHERE strftime(collection_date, '%Y-%m') = month GROUP BY organization_name
),
figures AS (
    SELECT organization_name,
           max(es) AS es_peak, sum(es) FILTER (WHERE day = (SELECT last_day FROM n_days)) AS es_end,
           sum(es) AS es_days,
           max(m365) AS m365_peak, sum(m365) FILTER (WHERE day = (SELECT last_day FROM n_days)) AS m365_end,
           sum(m365) AS m365_days,
           max(seats) AS seats_peak, sum(seats) FILTER (WHERE day = (SELECT last_day FROM n_days)) AS seats_end,
           sum(seats) AS seats_days
    FROM in_force GROUP BY organization_name
),
report AS (
    SELECT coalesce(f.organization_name, p.organization_name) AS organization_name,
           coalesce(p.nights, 0) AS nights,
           coalesce(f.es_peak, 0) AS es_peak, coalesce(f.es_end, 0) AS es_end, coalesce(f.es_days, 0) AS es_days,
           coalesce(f.m365_peak, 0) AS m365_peak, coalesce(f.m365_end, 0) AS m365_end,
           coalesce(f.m365_days, 0) AS m365_days,
           coalesce(f.seats_peak, 0) AS seats_peak, coalesce(f.seats_end, 0) AS seats_end,
           coalesce(f.seats_days, 0) AS seats_days
    FROM figures AS f FULL JOIN present AS p USING (organization_name)
    WHERE p.nights IS NOT NULL OR f.es_peak > 0 OR f.m365_peak > 0 OR f.seats_peak > 0
)
SELECT organization_name, nights::BIGINT AS nights,
       es_peak::BIGINT AS es_user_count_peak, es_end::BIGINT AS es_user_count_end,
       es_days::BIGINT AS es_user_count_seat_days,
       marts.billing_average(es_days, (SELECT n FROM n_days)) AS es_user_count_average,
       m365_peak::BIGINT AS m365_licensed_user_count_peak, m365_end::BIGINT AS m365_licensed_user_count_end,
       m365_days::BIGINT AS m365_licensed_user_count_seat_days,
       marts.billing_average(m365_days, (SELECT n FROM n_days)) AS m365_licensed_user_count_average,
       seats_peak::BIGINT AS backup_seats_peak, seats_end::BIGINT AS backup_seats_end,
       seats_days::BIGINT AS backup_seats_seat_days,
       marts.billing_average(seats_days, (SELECT n FROM n_days)) AS backup_seats_average
FROM report
ORDER BY lower(organization_name), organization_name;

-- billing_licenses_all(month): one row per organization and license (rule 6's names, equal ignoring case
-- as one, spelled as the first by rule 9 on the nights in force) with a non-zero figure, from each night's
-- holders (marts.org_license_history, recorded by the publish step before this runs) on the days it is in force.
CREATE OR REPLACE MACRO marts.billing_licenses_all(month) AS TABLE
WITH days AS (SELECT * FROM marts.billing_days(month)),
nights AS (  -- each night in force, the days it covers, and whether it is the one in force on the last day
    SELECT night, count(*) AS days, bool_or(day = (SELECT max(day) FROM days)) AS on_last_day
    FROM days WHERE night IS NOT NULL GROUP BY night
),
figures AS (  -- one row per night and license: its first spelling's, with the license's holders
    SELECT h.organization_name, lower(h.license_name) AS license_key, min(h.license_name) AS license_name,
           max(h.license_users) AS peak, sum(h.license_users) FILTER (WHERE n.on_last_day) AS last,
           sum(h.license_users * n.days) AS seat_days
    FROM marts.org_license_history AS h JOIN nights AS n ON h.collection_date = n.night
    WHERE h.first_spelling
    GROUP BY ALL
)
SELECT f.organization_name, f.license_name, f.peak::BIGINT AS users_peak,
       coalesce(f.last, 0)::BIGINT AS users_end, f.seat_days::BIGINT AS users_seat_days,
       marts.billing_average(f.seat_days, (SELECT count(*) FROM days)) AS users_average
FROM figures AS f
SEMI JOIN marts.billing_month(month) AS r USING (organization_name)
WHERE f.peak > 0
ORDER BY lower(f.organization_name), f.organization_name, lower(f.license_name), f.license_name;

-- billing_licenses(month, org): one organization's license rows.
CREATE OR REPLACE MACRO marts.billing_licenses(month, org) AS TABLE
SELECT * EXCLUDE (organization_name) FROM marts.billing_licenses_all(month) WHERE organization_name = org;

-- billing_items(month): the month as one long list for a PSA or billing sync: per organization (rule 9)
-- its three counts, then its licenses (rule 9).
CREATE OR REPLACE MACRO marts.billing_items(month) AS TABLE
WITH report AS (SELECT * FROM marts.billing_month(month)),
items AS (
    SELECT organization_name, 0 AS part, 'es_users' AS item_kind, 'es_users' AS item,
           es_user_count_peak AS peak, es_user_count_end AS "end", es_user_count_seat_days AS seat_days,
           es_user_count_average AS average FROM report
    UNION ALL
    SELECT organization_name, 1, 'm365_licensed_users', 'm365_licensed_users', m365_licensed_user_count_peak,
           m365_licensed_user_count_end, m365_licensed_user_count_seat_days, m365_licensed_user_count_average
    FROM report
    UNION ALL
    SELECT organization_name, 2, 'backup_seats', 'backup_seats', backup_seats_peak, backup_seats_end,
           backup_seats_seat_days, backup_seats_average FROM report
    UNION ALL
    SELECT organization_name, 3, 'license', license_name, users_peak, users_end, users_seat_days, users_average
    FROM marts.billing_licenses_all(month)
)
SELECT organization_name, item_kind, item, peak, "end", seat_days, average FROM items
ORDER BY lower(organization_name), organization_name, part, lower(item), item;

-- marts.billing_sealed: rule 15, the published bytes of every closed month, written once by the first
-- run that publishes a night after it and never rewritten. One row per body: the month's report and
-- items list (organization_name null) and each organization's report, each in JSON and CSV.
CREATE TABLE IF NOT EXISTS marts.billing_sealed (
    month VARCHAR NOT NULL, part VARCHAR NOT NULL, organization_name VARCHAR, fmt VARCHAR NOT NULL,
    body BLOB NOT NULL, sealed_by DATE NOT NULL, announced_at TIMESTAMPTZ);
