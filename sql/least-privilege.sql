-- walhook with least privilege: the login role, its store schema and read access to the
-- watched tables. For a DBA; run it as a superuser (or a role with CREATEROLE and the
-- right to grant on the tables), connected to the watched database:
--
--   psql "postgres://admin@db.example/app" -v password="$WALHOOK_PASSWORD" \
--        -f sql/least-privilege.sql
--
-- Optional variables: -v role=walhook (the login role), -v store_schema=walhook
-- (must equal [store] schema). Edit the GRANT SELECT list (step 3) to name the tables
-- of your [[tables]]. Then have the tables' owner run sql/publication.sql.
--
-- What the role can do afterwards: stream WAL through a slot (REPLICATION), read the
-- watched tables, and create and change tables in its own schema only. It is not a
-- superuser, owns no application table and cannot write to one. The slot is created by
-- walhook (`walhook setup` or at start); the publication is not, because PostgreSQL
-- lets only a table's owner publish it.
--
-- This file is not a migration (those are the numbered files in this directory).

\set ON_ERROR_STOP on
\if :{?role}
\else
  \set role walhook
\endif
\if :{?store_schema}
\else
  \set store_schema walhook
\endif
\if :{?password}
\else
  \echo 'least-privilege.sql: set the role''s password with -v password=...'
  \quit
\endif

-- 1. The login role. REPLICATION lets it open a replication connection and create its
--    slot; it grants no access to any table.
CREATE ROLE :"role" LOGIN REPLICATION PASSWORD :'password';
GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";

-- 2. The store: a schema owned by walhook, in which its migrations create the store
--    tables (events, deliveries, revisions, checkpoints, ...). Ownership is all it
--    needs: walhook does not create schemas when this one exists.
CREATE SCHEMA :"store_schema" AUTHORIZATION :"role";

-- 3. Read access to the watched tables: one line per [[tables]] entry.
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT ON TABLE public.users, public.user_roles TO :"role";

-- 4. Read access to other sessions' activity (pg_stat_activity), for `walhook backfill`:
--    a transaction that committed but waits for a synchronous standby is still invisible
--    to new snapshots, and a backfill chunk must not be read before it is visible. With
--    this role walhook sees such waits and waits for them; without it, it waits 0.5 s
--    for every invisible transaction and then reads. Read-only; drop it if you use no
--    synchronous standby.
GRANT pg_read_all_stats TO :"role";
