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
-- A CSV field as Python's csv module writes it (RFC 4180): quoted, quotes doubled, only when it holds
-- a comma, a quote, CR or LF; null as empty; booleans true/false.
CREATE OR REPLACE TEMP MACRO csv_field(v) AS
    CASE WHEN regexp_matches(v::VARCHAR, '[,"\r\n]') THEN '"' || replace(v::VARCHAR, '"', '""') || '"'
         ELSE coalesce(v::VARCHAR, '') END;
