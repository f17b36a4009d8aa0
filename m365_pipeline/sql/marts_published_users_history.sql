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
-- Close the open rows that no longer hold tonight, then open rows for what is new.
UPDATE marts.published_users_history AS h SET valid_to = (SELECT collection_date FROM tonight)
WHERE h.valid_to IS NULL AND NOT EXISTS (
    SELECT 1 FROM core.users AS u
    WHERE u.published AND u.user_principal_name = h.user_principal_name
      AND u.organization_name = h.organization_name AND u.display_name = h.display_name
      AND u.licenses = h.licenses AND u.has_email_license = h.has_email_license);
INSERT INTO marts.published_users_history
SELECT u.organization_name, u.user_principal_name, u.display_name, u.licenses, u.has_email_license,
       (SELECT collection_date FROM tonight), NULL
FROM core.users AS u
WHERE u.published AND NOT EXISTS (
    SELECT 1 FROM marts.published_users_history AS h
    WHERE h.valid_to IS NULL AND u.user_principal_name = h.user_principal_name
      AND u.organization_name = h.organization_name AND u.display_name = h.display_name
      AND u.licenses = h.licenses AND u.has_email_license = h.has_email_license);
