-- core.license_rules: one row per classification rule, from the rules file (license_rules.register_rules: the temporary table rules_frame).
CREATE OR REPLACE TABLE core.license_rules AS
SELECT rule_order::INTEGER AS rule_order, rule_id, applies_to, effect, field, match, pattern,
       like_pattern, description
FROM rules_frame
ORDER BY rule_order;
