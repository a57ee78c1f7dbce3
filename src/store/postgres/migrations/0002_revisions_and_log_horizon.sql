-- opsd's schema, version 2. Applied by opsd itself (`opsd migrate`, or at
-- start-up) in one transaction under an advisory lock.

-- Revisions come from one sequence, so an operation deleted and created
-- again under the same name never takes a revision its earlier life had:
-- a conditional write read from the earlier life (a stale replica) cannot
-- land on the new one. It starts above every revision still known.
CREATE SEQUENCE opsd_revisions AS bigint;
SELECT setval('opsd_revisions', greatest(
    (SELECT coalesce(max(revision), 0) FROM opsd_operations),
    (SELECT coalesce(max(revision), 0) FROM opsd_changes)) + 1, false);

-- Each change records its writing transaction (`pg_current_xact_id()`),
-- so a replica that starts while writes are in flight finds their changes
-- once they are visible, whatever their sequence numbers; and the writer's
-- random token of the write, so a write whose answer was lost can be found.
ALTER TABLE opsd_changes
    ADD COLUMN xid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    ADD COLUMN token bigint;

-- The highest sequence number pruned from the change log (8 bytes, big
-- endian): a replica that has not seen that far may have missed changes.
INSERT INTO opsd_meta (key, value) VALUES ('pruned-seq', int8send(0))
    ON CONFLICT (key) DO NOTHING;
