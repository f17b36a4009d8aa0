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
-- Rule 16: a CSV text cell starting with = + - @, a tab or a CR gets a leading ' (OWASP's advice on CSV
-- injection); other values are left as they are. api_bodies.neutralise is the same rule in Python
-- (test_csv_injection proves them equal); csv_cell is one cell as api_bodies.csv_bytes writes it.
CREATE OR REPLACE TEMP MACRO csv_neutralise(v) AS
    CASE WHEN typeof(v) = 'VARCHAR' AND left(v::VARCHAR, 1) IN ('=', '+', '-', '@', chr(9), chr(13))
         THEN '''' || v::VARCHAR ELSE v::VARCHAR END;
CREATE OR REPLACE TEMP MACRO csv_cell(v) AS csv_field(csv_neutralise(v));
