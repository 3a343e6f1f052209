-- A state database as scratchd 0.1.0 (the first release) wrote it: three active leases, one ended.
BEGIN TRANSACTION;
CREATE TABLE events (
    -- Not AUTOINCREMENT (a second table written on every insert): prune() always keeps
    -- the newest event, so max(seq) + 1 never hands out a number twice.
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    lease_id TEXT,
    pool TEXT,
    tenant TEXT,
    reason TEXT,
    details TEXT
);
INSERT INTO "events" VALUES(1,1800000000.0,'lease_created','00000000000001aaaaaaaaaaaaaaaaaaa','main','ci',NULL,NULL);
INSERT INTO "events" VALUES(2,1800000000.0,'lease_created','00000000000002aaaaaaaaaaaaaaaaaaa','main','ci',NULL,NULL);
INSERT INTO "events" VALUES(3,1800000000.0,'lease_created','00000000000003aaaaaaaaaaaaaaaaaaa','main','ci',NULL,NULL);
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    pool TEXT NOT NULL,
    tenant TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    state TEXT NOT NULL,
    end_reason TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL,
    ttl_seconds INTEGER NOT NULL,
    idle_timeout_seconds INTEGER,
    pid INTEGER,
    pid_start_time INTEGER,
    max_bytes INTEGER,
    expected_bytes INTEGER,
    evictable INTEGER NOT NULL,
    labels TEXT NOT NULL,
    same_filesystem INTEGER,
    mount_point TEXT,
    last_activity_at REAL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    usage_files INTEGER NOT NULL DEFAULT 0,
    usage_measured_at REAL
);
INSERT INTO "leases" VALUES('00000000000001aaaaaaaaaaaaaaaaaaa','/pool/00000000000001aaaaaaaaaaaaaaaaaaa','main','ci',1000,1000,'active',NULL,1800000000.0,1800003600.0,NULL,3600,NULL,NULL,NULL,NULL,NULL,0,'{"job": "1"}',1,'/',NULL,0,0,NULL);
INSERT INTO "leases" VALUES('00000000000002aaaaaaaaaaaaaaaaaaa','/pool/00000000000002aaaaaaaaaaaaaaaaaaa','main','ci',1000,1000,'active',NULL,1800000000.0,1800003600.0,NULL,3600,NULL,NULL,NULL,NULL,NULL,0,'{"job": "2"}',0,'/',NULL,0,0,NULL);
INSERT INTO "leases" VALUES('00000000000003aaaaaaaaaaaaaaaaaaa','/pool/00000000000003aaaaaaaaaaaaaaaaaaa','main','ci',1000,1000,'active',NULL,1800000000.0,1800003600.0,NULL,3600,NULL,NULL,NULL,NULL,NULL,0,'{"job": "3"}',NULL,'/',NULL,0,0,NULL);
INSERT INTO "leases" VALUES('00000000000004aaaaaaaaaaaaaaaaaaa','/pool/00000000000004aaaaaaaaaaaaaaaaaaa','main','ci',1000,1000,'ended','released',1800000000.0,1800003600.0,1800000005.0,3600,NULL,NULL,NULL,NULL,NULL,0,'{"job": "4"}',1,'/',NULL,0,0,NULL);
CREATE TABLE orphans (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (pool, name)
);
CREATE INDEX leases_state ON leases (state, ended_at);
CREATE INDEX events_at ON events (at);
COMMIT;
