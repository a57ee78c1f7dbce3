-- opsd's schema, version 1. Applied by opsd itself (`opsd migrate`, or at
-- start-up) in one transaction under an advisory lock.

-- One row per operation. The encoded record (without its name and request
-- id, which have their own columns) is the truth; the other columns repeat
-- what the store indexes and filters on.
CREATE TABLE opsd_operations (
    -- "C": byte order, the order List pages walk (keyset pagination).
    name text COLLATE "C" PRIMARY KEY,
    parent text COLLATE "C" NOT NULL,
    -- Every write bumps it; conditional writes check it.
    revision bigint NOT NULL,
    -- The idempotency key of the create call (bytes: any string).
    request_id bytea UNIQUE,
    done boolean NOT NULL,
    -- Set exactly when the operation failed.
    error_code integer,
    -- The type URLs of metadata and response; NULL when unset.
    metadata_type bytea,
    response_type bytea,
    -- Times as (seconds, nanoseconds) since the epoch.
    create_s bigint,
    create_ns integer,
    update_s bigint,
    update_ns integer,
    -- Nanoseconds since the epoch: lease, forced cancel or script step
    -- while running, retention expiry once done.
    next_deadline bigint,
    -- Nanoseconds: a replica's claim on the due deadline; writes clear it.
    claimed_until bigint,
    record bytea NOT NULL
);

CREATE INDEX opsd_operations_deadline ON opsd_operations (next_deadline)
    WHERE next_deadline IS NOT NULL;
CREATE INDEX opsd_operations_running ON opsd_operations (name) WHERE NOT done;

-- The change log every write appends to in its own transaction; replicas
-- read it to catch up with what their notifications missed. Pruned by age.
CREATE TABLE opsd_changes (
    seq bigserial PRIMARY KEY,
    name text COLLATE "C" NOT NULL,
    cause text NOT NULL,
    revision bigint NOT NULL,
    previous_deadline bigint,
    deadline bigint,
    -- The writing replica's clock, nanoseconds since the epoch.
    time_ns bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX opsd_changes_at ON opsd_changes (at);

-- Operations by state, striped over 64 rows so concurrent writers rarely
-- wait on one another; the counts are the sums.
CREATE TABLE opsd_counts (
    slot integer PRIMARY KEY,
    running bigint NOT NULL DEFAULT 0,
    done bigint NOT NULL DEFAULT 0
);

INSERT INTO opsd_counts (slot) SELECT generate_series(0, 63);

-- Store-wide facts, e.g. the key that signs List page tokens.
CREATE TABLE opsd_meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);
