//! The store's tables and indexes, created on first open (see `Store::open`), and the
//! in-place migrations of older stores.

/// Bumped whenever the schema changes. An older store is migrated in place on open (additive
/// changes only, see `MIGRATIONS`); a newer one is refused.
pub const SCHEMA_VERSION: i64 = 7;

/// Written into the SQLite header of every store (`PRAGMA application_id`), so a store is
/// known as one by its first 100 bytes ("FIDX").
pub const APPLICATION_ID: i32 = 0x4649_4458;

/// Seconds an "adding" job stays alive without a heartbeat (see `Store::renew_jobs`).
pub const JOB_TTL: f64 = 30.0;

/// What the sample filters and their facets add (schema 4). Phase 2 writes `format`, so the
/// format index is partial (phase 1's NULL rows stay out of it). The facets are read from
/// counters in O(distinct values), never by counting rows: a row born with a format (COCO
/// ingest) is counted by a trigger; phase 2, the one writer that gives a pending row its format,
/// adds its batch's counts itself (`Store::record_probes`: one upsert per format per batch, where
/// a trigger cost ~2.5 us a row). The boxes' only writer, the COCO ingest, recounts its
/// dataset's categories once at its end from the category index (`Store::count_categories`;
/// per-box triggers made the ingest ~40% slower). `delete_dataset` drops the counters. Sizes and path globs have no index of their own
/// (each one would be written by every probe): they are checked on the id-ordered walk of
/// whichever index drives the page (dataset, format or category).
macro_rules! filters_sql {
    () => {
        "
CREATE INDEX IF NOT EXISTS samples_by_format ON samples (dataset_id, format, id)
    WHERE format IS NOT NULL;
-- A page of one category walks this in sample order (the boxes are clustered by sample).
CREATE INDEX IF NOT EXISTS annotations_by_category ON annotations (category_id, sample_id);
CREATE TABLE IF NOT EXISTS format_counts (
    dataset_id INTEGER NOT NULL,
    format TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, format)
) WITHOUT ROWID;
-- Samples (not boxes) per category, as the category filter counts them.
CREATE TABLE IF NOT EXISTS category_counts (
    category_id INTEGER PRIMARY KEY,
    n INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS format_count_insert AFTER INSERT ON samples
WHEN NEW.format IS NOT NULL BEGIN
    INSERT INTO format_counts (dataset_id, format, n) VALUES (NEW.dataset_id, NEW.format, 1)
        ON CONFLICT (dataset_id, format) DO UPDATE SET n = n + 1;
END;
"
    };
}

/// The queues' indexes (schema 5). Each queue step (a probe batch, an embed claim, a release of
/// claims, a final sweep) reads the rows of one status in id order; with these partial indexes
/// it costs O(rows it takes + log n) at any dataset size, where a walk of (dataset_id, id)
/// checking the status cost O(dataset) per step (adding 10 files to 10M rows meant a 10M-row
/// scan). Each index holds only the rows in its status, so at rest (every row `ready`) they are
/// empty. The price is one index write when a row enters or leaves one of these statuses:
/// phase 1 adds a `pending` entry per row (appended at the index's right end, as the rows
/// are), phase 2 moves it to `indexed`, a claim to `embedding`, and `ready` leaves them all.
/// Measured on 300k files (2-core VM): ~15% more CPU in phase 1 (0.75 -> 0.86 s) and phase 2
/// (1.42 -> 1.65 s), wall time within the machine's noise; a full `(dataset_id, status, id)`
/// index cost the same and stays as large as the dataset. Against that, one kick of phase 2
/// on a 10M-row dataset went from ~9 s to ~10 ms (`benches/scale/paging.py`).
/// A writer that puts an old row back into a queue (a changed file, a retried failure) needs
/// nothing else: the index finds it wherever its id lies. `jobs_running` serves progress's
/// "is a walk still adding" check in O(running jobs) instead of a scan of every job, and
/// `samples_walk_failed` phase 1's look for the walk failures of its root (broken links,
/// unreadable folders: few), where the `failed` index read every failed row of the dataset
/// (~1 s for 50k failures at 10M rows, on each add of a folder).
macro_rules! queues_sql {
    () => {
        "
CREATE INDEX IF NOT EXISTS samples_pending ON samples (dataset_id, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS samples_indexed ON samples (dataset_id, id) WHERE status = 'indexed';
CREATE INDEX IF NOT EXISTS samples_embedding ON samples (dataset_id, id)
    WHERE status = 'embedding';
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (dataset_id) WHERE running_owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS samples_walk_failed ON samples (root_id)
    WHERE status = 'failed' AND size_bytes IS NULL;
"
    };
}

/// What the worker leases add (schema 6) besides the two columns of `samples`: rows a worker
/// died with are rare, so a partial index finds them without touching the others.
macro_rules! batches_sql {
    () => {
        "
CREATE INDEX IF NOT EXISTS samples_suspect ON samples (dataset_id, id) WHERE attempts > 0;
"
    };
}

/// `(version it upgrades from, SQL)`, applied in order inside the opening transaction. Each
/// step only adds (columns, tables, meta keys), so an older fastindex reading the migrated
/// store is refused by the version check rather than misled.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "ALTER TABLE jobs ADD COLUMN heartbeat REAL;
         UPDATE jobs SET heartbeat = created_at WHERE running_owner IS NOT NULL;
         INSERT OR IGNORE INTO meta (key, value)
             SELECT 'last_dataset_id', CAST(COALESCE(MAX(id), 0) AS TEXT) FROM datasets;",
    ),
    (2, THROUGHPUT),
    // 3 -> 4: the filters' indexes and the facets' counters (see `filters_sql!`), filled from
    // the rows already there.
    (
        3,
        concat!(
            filters_sql!(),
            "INSERT OR REPLACE INTO format_counts (dataset_id, format, n)
                 SELECT dataset_id, format, COUNT(*) FROM samples
                 WHERE format IS NOT NULL GROUP BY dataset_id, format;
             INSERT OR REPLACE INTO category_counts (category_id, n)
                 SELECT category_id, COUNT(DISTINCT sample_id) FROM annotations GROUP BY category_id;"
        ),
    ),
    // 4 -> 5: the queues' partial indexes (see `queues_sql!`), built from the rows there.
    (4, queues_sql!()),
    // 5 -> 6: phase 3 on workers (see `batches.rs`): the lease a row is out under and its
    // attempts. Adding a column with a constant default rewrites no row.
    (
        5,
        concat!(
            "ALTER TABLE samples ADD COLUMN lease_id INTEGER;
             ALTER TABLE samples ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;",
            batches_sql!()
        ),
    ),
    // 6 -> 7 (issue 9, object-storage roots): the ETag an object had when it was listed, so
    // that adding a bucket again can tell a changed object from the same one (objects are
    // compared by ETag and size, not by last-modified). NULL for files.
    (6, "ALTER TABLE samples ADD COLUMN etag TEXT;"),
];

/// Recent commits per phase, for rates (see `throughput.rs`): a few dozen rows per phase.
pub(crate) const THROUGHPUT: &str = "
-- `n` rows of `phase` committed between the entry before and `t`; `t0` is when the entry
-- was opened (later commits within a second are merged into it).
CREATE TABLE IF NOT EXISTS throughput (
    dataset_id INTEGER NOT NULL,
    phase TEXT NOT NULL,
    t0 REAL NOT NULL,
    t REAL NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, phase, t0)
) WITHOUT ROWID;
";

pub(crate) const SCHEMA: &str = concat!(
    "
-- `schema_version`; `last_dataset_id` (the highest dataset id ever given, so an id is never
-- reused after a delete); `next_annotation_id`.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    embed_spec TEXT
);
CREATE TABLE IF NOT EXISTS roots (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    UNIQUE (dataset_id, path)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    added INTEGER NOT NULL DEFAULT 0,
    existing INTEGER NOT NULL DEFAULT 0,
    warnings TEXT NOT NULL DEFAULT '[]',
    -- `host:pid:n` of the connection adding this job's rows; NULL once they are all committed.
    running_owner TEXT,
    -- When that owner last said it is still adding (seconds since the epoch): the job counts
    -- as running only while this is younger than JOB_TTL.
    heartbeat REAL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    root_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER,
    mtime_ns INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',
    width INTEGER,
    height INTEGER,
    format TEXT,
    orientation INTEGER,
    error TEXT,
    coco_width INTEGER,
    coco_height INTEGER,
    size_mismatch INTEGER NOT NULL DEFAULT 0,
    -- Phase 3 on workers (`batches.rs`): the lease a row is out under, and how many workers
    -- died with it.
    lease_id INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- The object's ETag when listed (object-storage roots only; see MIGRATIONS 6 -> 7).
    etag TEXT,
    UNIQUE (root_id, path)
);
-- Pages in id order walk (dataset_id, id). The queue statuses and `failed` have partial
-- indexes of their own (see `queues_sql!`): a step of a queue reads only its rows.
CREATE INDEX IF NOT EXISTS samples_by_dataset ON samples (dataset_id, id);
CREATE INDEX IF NOT EXISTS samples_failed ON samples (dataset_id, id) WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS counts (
    dataset_id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, job_id, status)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS phase_errors (
    dataset_id INTEGER NOT NULL,
    phase TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (dataset_id, phase)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    dataset_id INTEGER NOT NULL,
    phase TEXT NOT NULL,
    owner TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    PRIMARY KEY (dataset_id, phase)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS coco_files (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    UNIQUE (dataset_id, path)
);
CREATE TABLE IF NOT EXISTS categories (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    supercategory TEXT,
    coco_id INTEGER,
    UNIQUE (dataset_id, name)
);
-- Clustered by sample (no second index to keep up during a 700k-box ingest); `id` comes
-- from meta.next_annotation_id.
CREATE TABLE IF NOT EXISTS annotations (
    sample_id INTEGER NOT NULL,
    id INTEGER NOT NULL,
    file_id INTEGER NOT NULL,
    category_id INTEGER NOT NULL,
    coco_id INTEGER,
    x REAL NOT NULL, y REAL NOT NULL, w REAL NOT NULL, h REAL NOT NULL,
    area REAL,
    iscrowd INTEGER NOT NULL DEFAULT 0,
    segmentation TEXT,
    PRIMARY KEY (sample_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS coco_missing (
    job_id INTEGER NOT NULL,
    coco_image_id INTEGER NOT NULL,
    file_name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    pretrained TEXT NOT NULL,
    dim INTEGER NOT NULL,
    UNIQUE (name, pretrained)
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL,
    sample_id INTEGER NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (model_id, sample_id)
);
",
    filters_sql!(),
    queues_sql!(),
    batches_sql!()
);
