-- rvqstore schema 1: configuration, originals, versioned codebooks, code blocks, tombstones.
-- Applied by rvqstore.storage.migrations inside the same transaction as its record.

CREATE TABLE rvq_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per live vector: its id, optional unique text key, and the original
-- (bytes in the format named by meta 'originals'; NULL when originals are not kept).
CREATE TABLE rvq_vectors (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE,
    vector BLOB
);

-- Deleted ids whose codes still sit in code blocks; compact() frees them.
CREATE TABLE rvq_deleted (
    id INTEGER PRIMARY KEY
);

-- Versioned codebooks. One version is 'active' (meta 'active_version'); a retrain writes a
-- 'building' version with its blocks, then switches in one transaction.
CREATE TABLE rvq_codebooks (
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('building', 'active', 'retired')),
    stages INTEGER NOT NULL,
    codebook_size INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    data BLOB NOT NULL,              -- float32 (stages, codebook_size, dim), little-endian
    created_at TEXT NOT NULL,
    train_count INTEGER NOT NULL,    -- vectors the codebooks were fitted on
    train_mse REAL NOT NULL,         -- mean squared quantization error at training
    added_count INTEGER NOT NULL DEFAULT 0,   -- vectors encoded by add() since
    added_sq_error REAL NOT NULL DEFAULT 0.0  -- and the sum of their squared errors
);

-- Codes in blocks of consecutive vectors: ids int64, codes uint8 (count, stages),
-- norms float32 (||x^||^2), all little-endian.
CREATE TABLE rvq_blocks (
    version INTEGER NOT NULL REFERENCES rvq_codebooks(version),
    block INTEGER NOT NULL,
    count INTEGER NOT NULL,
    ids BLOB NOT NULL,
    codes BLOB NOT NULL,
    norms BLOB NOT NULL,
    PRIMARY KEY (version, block)
);
