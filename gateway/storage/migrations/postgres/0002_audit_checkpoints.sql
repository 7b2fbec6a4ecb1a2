-- Signed checkpoints of the audit chain (seq, the entry's hash): verification re-hashes only
-- what came after the latest one, so it costs what the log grew by, not the whole log.
CREATE TABLE audit_checkpoints (
    seq bigint PRIMARY KEY REFERENCES audit (seq),
    hash text NOT NULL,
    time text NOT NULL,
    key text NOT NULL,
    sig text NOT NULL
);
