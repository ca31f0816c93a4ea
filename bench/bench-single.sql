-- bench-single.sql — pgbench custom script: ONE row change per transaction (autocommit),
-- Copied from the CDC-to-webhooks bench kit (bench-kit/bench-single.sql) so bench/run is self-contained.
-- identity-service mix. Needs -D nusers=N -D norgs=N -D napps=N matching workload.sql.
-- Mix (per transaction): 30% insert user, 35% update user, 10% delete user (cascades ~1
-- user_roles row for seeded users), 10% grant role, 5% revoke role, 5% update application
-- status, 3% insert application, 2% update organisation. Some updates/deletes hit nothing;
-- limits.sh counts the rows actually changed from pg_stat_user_tables, not transactions.
\set half :nusers / 2
\set r random(1, 100)
\set uid random(1, :half)
\set org random(1, :norgs)
\set role random(1, :norgs * 5)
\set app random(1, :napps)
\if :r <= 30
INSERT INTO users (org_id, email, display_name, status, password_hash)
  VALUES (:org, gen_random_uuid()::text || '@example.org', 'New User ' || :uid, 'pending',
          '$2b$12$' || md5(random()::text) || 'R9h/cIPz0gi.URNNX3kh2O');
\elif :r <= 65
UPDATE users SET status = CASE WHEN status = 'active' THEN 'suspended' ELSE 'active' END,
                 last_login_at = now(), updated_at = now()
  WHERE id = :uid;
\elif :r <= 75
SELECT last_value AS maxid FROM users_id_seq \gset
\set duid random(:half + 1, :maxid)
DELETE FROM users WHERE id = :duid;
\elif :r <= 85
INSERT INTO user_roles (user_id, role_id) VALUES (:uid, :role) ON CONFLICT DO NOTHING;
\elif :r <= 90
DELETE FROM user_roles WHERE (user_id, role_id) IN
  (SELECT user_id, role_id FROM user_roles WHERE user_id = :uid ORDER BY role_id LIMIT 1);
\elif :r <= 95
UPDATE applications SET status = CASE WHEN status = 'active' THEN 'disabled' ELSE 'active' END,
                        updated_at = now()
  WHERE id = :app;
\elif :r <= 98
INSERT INTO applications (org_id, name, client_id, status, redirect_uri)
  VALUES (:org, 'New App', gen_random_uuid()::text, 'active', 'https://new.example.org/cb');
\else
UPDATE organisations SET updated_at = now(),
                         plan = CASE WHEN plan = 'free' THEN 'team' ELSE 'free' END
  WHERE id = :org;
\endif
