-- The publication walhook streams from, FOR TABLE the watched tables. Run it as the
-- owner of those tables (PostgreSQL lets only a table's owner add it to a publication;
-- a superuser may too). Creating a publication also needs CREATE on the database,
-- which the database's owner has:
--
--   psql "postgres://app_owner@db.example/app" -f sql/publication.sql
--
-- The table list must equal the tables of [[tables]]: `walhook setup --print-sql -c
-- walhook.toml` prints this statement for your config, and `walhook check` names any
-- difference. walhook then finds the publication in step and leaves it alone. When the
-- config gains a table, run the ALTER PUBLICATION statement `walhook check` prints.
-- The name must equal [source] publication (default "walhook").

\set ON_ERROR_STOP on

-- Rules that read `old` (user.suspended) and update_columns need the old row, which
-- PostgreSQL sends only with REPLICA IDENTITY FULL. (Also run by the table owner.)
ALTER TABLE public.users REPLICA IDENTITY FULL;

CREATE PUBLICATION walhook FOR TABLE public.users, public.user_roles;
