-- The pin objects of the Pinning Service API each gateway serves for its own Kubo node (node:
-- that node's peer id): replicas of other sites' records, kept until the requester deletes them.
CREATE TABLE pin_requests (
    requestid  text COLLATE "C" PRIMARY KEY,
    node       text COLLATE "C" NOT NULL,
    cid        text COLLATE "C" NOT NULL,
    status     text NOT NULL CHECK (status IN ('queued', 'pinning', 'pinned', 'failed')),
    created_us bigint NOT NULL,
    owner      text NOT NULL,
    name       text,
    origins    text NOT NULL,
    meta       text NOT NULL,
    details    text
);
CREATE INDEX pin_requests_by_cid ON pin_requests (node, cid);
CREATE INDEX pin_requests_by_time ON pin_requests (node, created_us);
