-- walhook store, version 5: the context an event carried (`[[tables.context]]`): the
-- parent rows read from the source database when the event was ingested, by context
-- name (`null` for a parent that was not found). NULL when the table has no context.
-- A nullable column without a default: adding it rewrites nothing, and version 4 keeps
-- writing and reading the log beside version 5 during a rolling upgrade.
ALTER TABLE {schema}.events ADD COLUMN context json;
