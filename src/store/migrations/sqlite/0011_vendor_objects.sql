-- The objects the vendor-compatible APIs keep beside the native sessions (Anthropic's agents,
-- environments and the session records binding a native session to them): one row per version,
-- the body being the object as that API shows it (JSON). An object that is not versioned has
-- version 1 only. `archived_at` repeats the body's, so lists can leave archived objects out.
CREATE TABLE vendor_objects (
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    archived_at TEXT,
    PRIMARY KEY (tenant, kind, id, version)
);
CREATE INDEX vendor_objects_by_created ON vendor_objects (tenant, kind, created_at, id);
