-- The FHIR facade's search index: one row per version of each FHIR resource a record embeds
-- (where it is: the record's CID and a JSON pointer), and the values search finds it by.
-- Keyed pseudonyms only (type and id, patient, episode, codes, references); dates in clear.
CREATE TABLE fhir_resources (
    entry       bigserial PRIMARY KEY,             -- write order
    type        text COLLATE "C" NOT NULL,
    rid         text COLLATE "C" NOT NULL,
    patient     text COLLATE "C" NOT NULL,
    episode     text COLLATE "C" NOT NULL,
    version     integer NOT NULL,
    latest      smallint NOT NULL,
    cid         text COLLATE "C" NOT NULL,
    pointer     text COLLATE "C" NOT NULL,
    recorded_at text NOT NULL,
    UNIQUE (cid, pointer),
    UNIQUE (type, rid, patient, version)
);
CREATE INDEX fhir_latest_by_type ON fhir_resources (type, latest, entry);
CREATE INDEX fhir_latest_by_patient ON fhir_resources (patient, latest, entry);

CREATE TABLE fhir_params (
    entry bigint NOT NULL REFERENCES fhir_resources (entry) ON DELETE CASCADE,
    name  text COLLATE "C" NOT NULL,
    token text COLLATE "C",
    low   text COLLATE "C",
    high  text COLLATE "C"
);
CREATE INDEX fhir_params_by_token ON fhir_params (name, token);
CREATE INDEX fhir_params_by_entry ON fhir_params (entry);
