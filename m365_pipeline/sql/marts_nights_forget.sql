-- Forget the kept nights (rule 11) dated on or after forget_from.d: a date re-run replaces its night,
-- and a night recorded but never served (a run killed between the DuckDB commit and the version swap)
-- is undone. Nights are recorded in date order, so the forgotten nights are the latest ones: the
-- history rows they opened go, and the rows they closed hold again.
DELETE FROM marts.published_users_history WHERE valid_from >= (SELECT d FROM forget_from);
UPDATE marts.published_users_history SET valid_to = NULL WHERE valid_to >= (SELECT d FROM forget_from);
DELETE FROM marts.org_summary_history WHERE collection_date >= (SELECT d FROM forget_from);
DELETE FROM marts.nights WHERE collection_date >= (SELECT d FROM forget_from);
