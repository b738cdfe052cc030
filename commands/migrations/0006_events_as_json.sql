-- An event's data and metadata are kept as the text they were written as (`json`), not parsed
-- into `jsonb`: the log never looks inside them (no query reads a field of either), so parsing
-- on every insert and printing on every read was work for nothing. `json` still checks that
-- the text is JSON. On a large log this rewrites the table under an exclusive lock: run it in
-- a maintenance window.
ALTER TABLE events
    ALTER COLUMN data TYPE json USING data::json,
    ALTER COLUMN metadata TYPE json USING metadata::json;
