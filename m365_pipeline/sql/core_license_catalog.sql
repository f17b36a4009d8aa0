-- core.license_catalog: every license name ever seen and when, across runs (for the new-license check).
-- $1 = this run's last_collected.
CREATE TABLE IF NOT EXISTS core.license_catalog (
    license_key VARCHAR PRIMARY KEY, license_name VARCHAR, is_m365_license BOOLEAN,
    is_email_license BOOLEAN, first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ);

INSERT INTO core.license_catalog AS c
SELECT lower(license_name), min(license_name), bool_or(is_m365_license), bool_or(is_email_license),
       $1::TIMESTAMPTZ, $1::TIMESTAMPTZ
FROM core.license_assignments GROUP BY lower(license_name)
ON CONFLICT (license_key) DO UPDATE SET
    last_seen = excluded.last_seen, is_m365_license = excluded.is_m365_license,
    is_email_license = excluded.is_email_license,
    first_seen = least(c.first_seen, excluded.first_seen);
