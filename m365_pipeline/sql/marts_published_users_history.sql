-- marts.published_users_history: the published users (rule 7 rows) of every kept night, as
-- valid_from / valid_to collection dates (rule 11): a row holds on night d when
-- valid_from <= d and (valid_to is null or d < valid_to), so storage grows with the changes, not
-- with nights x users. Run inside the publish step's transaction; tonight is the latest night
-- (recording an earlier date than a kept one is refused before this runs).
CREATE TABLE IF NOT EXISTS marts.published_users_history (
    organization_name VARCHAR NOT NULL, user_principal_name VARCHAR NOT NULL, display_name VARCHAR NOT NULL,
    licenses VARCHAR NOT NULL, has_email_license BOOLEAN NOT NULL,
    valid_from DATE NOT NULL, valid_to DATE);

-- A night re-run on its date was forgotten first (marts_nights_forget.sql).
-- One join of the open rows with tonight's published users finds both the open rows that no longer
-- hold tonight (closed) and what is new (opened); every column is compared (all are NOT NULL).
CREATE OR REPLACE TEMP TABLE night_rows AS
SELECT h.rowid AS open_row, u.organization_name, u.user_principal_name, u.display_name, u.licenses,
       u.has_email_license
FROM (SELECT rowid, * FROM marts.published_users_history WHERE valid_to IS NULL) AS h
FULL OUTER JOIN (SELECT * FROM core.users WHERE published) AS u
    ON u.user_principal_name = h.user_principal_name AND u.organization_name = h.organization_name
   AND u.display_name = h.display_name AND u.licenses = h.licenses AND u.has_email_license = h.has_email_license
WHERE h.rowid IS NULL OR u.user_principal_name IS NULL;
UPDATE marts.published_users_history SET valid_to = (SELECT collection_date FROM tonight)
WHERE rowid IN (SELECT open_row FROM night_rows WHERE user_principal_name IS NULL);
INSERT INTO marts.published_users_history
SELECT organization_name, user_principal_name, display_name, licenses, has_email_license,
       (SELECT collection_date FROM tonight), NULL
FROM night_rows WHERE open_row IS NULL;
DROP TABLE night_rows;
