-- bench-batch.sql — pgbench custom script: ~100 row changes per transaction.
-- Copied from the CDC-to-webhooks bench kit (bench-kit/bench-batch.sql) so bench/run is self-contained.
-- Needs -D nusers=N -D norgs=N -D napps=N matching workload.sql.
-- Per transaction: insert 40 users, update 40 users (contiguous id range in the
-- never-deleted lower half), grant 10 roles, delete 5 users (contiguous range above
-- nusers/2, cascades their ~1 user_roles row each), update 5 applications.
-- Row locks are taken in ascending id order within each statement, and statements
-- always run in the same order, so concurrent batches wait but do not deadlock.
\set half :nusers / 2
\set ustart random(1, :half - 40)
\set gstart random(1, :half - 10)
\set org random(1, :norgs)
\set role random(1, :norgs * 5)
\set astart random(1, :napps - 5)
SELECT last_value AS maxid FROM users_id_seq \gset
\set dstart random(:half + 1, :maxid - 5)
BEGIN;
INSERT INTO users (org_id, email, display_name, status, password_hash)
  SELECT :org, gen_random_uuid()::text || '@example.org', 'Batch User ' || g, 'pending',
         '$2b$12$' || md5(g::text || random()::text) || 'R9h/cIPz0gi.URNNX3kh2O'
  FROM generate_series(1, 40) g;
UPDATE users SET status = CASE WHEN status = 'active' THEN 'suspended' ELSE 'active' END,
                 last_login_at = now(), updated_at = now()
  WHERE id BETWEEN :ustart AND :ustart + 39;
INSERT INTO user_roles (user_id, role_id)
  SELECT u, :role FROM generate_series(:gstart, :gstart + 9) u ON CONFLICT DO NOTHING;
DELETE FROM users WHERE id BETWEEN :dstart AND :dstart + 4;
UPDATE applications SET status = CASE WHEN status = 'active' THEN 'disabled' ELSE 'active' END,
                        updated_at = now()
  WHERE id BETWEEN :astart AND :astart + 4;
COMMIT;
