-- Run once by `pgvigil agent --init primary --init-sql` on the new primary, as the superuser.
CREATE ROLE app LOGIN PASSWORD 'app-secret';
CREATE DATABASE app OWNER app;
\connect app
CREATE TABLE ticks (
    app text NOT NULL,
    n bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, n)
);
ALTER TABLE ticks OWNER TO app;
-- A commit is acknowledged once a standby has it too, so a failover loses none (standbys
-- copy this setting, so a promoted one keeps it).
ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)';
SELECT pg_reload_conf();
