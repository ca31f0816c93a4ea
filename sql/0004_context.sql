-- walhook store, version 4: the context an event carried (`[[tables.context]]`): the
-- parent rows read from the source database when the event was ingested, by context
-- name (`null` for a parent that was not found). NULL when the table has no context.
-- A nullable column without a default: adding it rewrites nothing, and version 3 keeps
-- writing and reading the log beside version 4 during a rolling upgrade.
ALTER TABLE {schema}.events ADD COLUMN context json;
