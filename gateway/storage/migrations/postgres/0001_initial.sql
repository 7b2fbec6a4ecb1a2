-- The gateway's stores in one PostgreSQL database, shared by every gateway that names it.
-- Identifiers compare byte-wise (COLLATE "C"), as in the embedded SQLite stores.

-- Episode heads (moved only by compare-and-swap), the record index, idempotency keys, attachments.
CREATE TABLE episodes (
    id               text COLLATE "C" PRIMARY KEY,
    patient          text COLLATE "C" NOT NULL,
    head             text NOT NULL,
    length           integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('open', 'closed')),
    last_recorded_at text NOT NULL,
    created          bigserial NOT NULL UNIQUE  -- creation order, for listings
);
CREATE INDEX episodes_by_patient ON episodes (patient, created);

CREATE TABLE records (
    cid             text COLLATE "C" PRIMARY KEY,
    episode         text COLLATE "C" NOT NULL REFERENCES episodes (id),
    patient         text COLLATE "C" NOT NULL,
    seq             integer NOT NULL,
    schema          text NOT NULL,
    recorded_at     text NOT NULL,
    digest          text,
    idempotency_key text UNIQUE,
    UNIQUE (episode, seq)
);
CREATE INDEX records_by_digest ON records (episode, digest);

CREATE TABLE blobs (
    cid          text COLLATE "C" PRIMARY KEY,
    patient      text COLLATE "C" NOT NULL,
    encrypted    boolean NOT NULL,
    content_type text
);

-- API tokens, as SHA-256 hashes only.
CREATE TABLE tokens (
    id           text COLLATE "C" PRIMARY KEY,
    name         text COLLATE "C" NOT NULL,
    token_hash   text NOT NULL UNIQUE,
    role         text NOT NULL,
    patients     text,              -- JSON list, NULL = no restriction
    episodes     text,              -- JSON list, NULL = no restriction
    created_at   double precision NOT NULL,  -- Unix seconds
    expires_at   double precision,
    revoked_at   double precision,
    last_used_at double precision
);
-- A name names one live token; a revoked token's name may be given to its replacement.
CREATE UNIQUE INDEX tokens_live_name ON tokens (name) WHERE revoked_at IS NULL;

-- The audit log: one hash chain for every gateway. An append locks the chain's head row, so
-- appends from every gateway are serialized and the chain never forks.
CREATE TABLE audit (
    seq   bigint PRIMARY KEY,
    event text NOT NULL,
    prev  text NOT NULL,
    hash  text NOT NULL
);
CREATE TABLE audit_head (
    id   smallint PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO audit_head VALUES (1, 0, repeat('0', 64));

-- Keys: wrapped data keys and tombstones by patient pseudonym, the state every gateway shares,
-- the gateways' signing keys. The key-encryption keys are never here.
CREATE TABLE key_state (
    id              smallint PRIMARY KEY CHECK (id = 1),
    active_kek      text NOT NULL,
    pseudonym_check text NOT NULL
);
CREATE TABLE patient_keys (
    pseudonym   text COLLATE "C" PRIMARY KEY,
    dek_id      text COLLATE "C" UNIQUE,
    kek_id      text,
    wrapped     bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    shredded_at timestamptz,
    CHECK ((wrapped IS NULL) = (kek_id IS NULL))
);
CREATE TABLE gateway_keys (
    key_id        text COLLATE "C" PRIMARY KEY,
    gateway_id    text NOT NULL,
    public_key    bytea NOT NULL,
    kek_ids       text[] NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    mac           bytea NOT NULL  -- HMAC under the deployment's shared secret (see GatewayKey)
);
