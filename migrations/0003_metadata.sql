-- rvqstore schema 3: per-vector metadata (a JSON object as text, NULL for none) and document
-- text, written in the same transaction as the vector. Filters evaluate the metadata from
-- typed in-memory columns; this table is the durable copy.

ALTER TABLE rvq_vectors ADD COLUMN metadata TEXT;

ALTER TABLE rvq_vectors ADD COLUMN document TEXT;

-- Keyword search over the documents: an FTS5 index whose content is rvq_vectors.document.
-- Kept in step by the store's own writes in the same transactions, not by triggers (a store
-- runs no SQL from a file's schema, and trusted_schema=OFF forbids triggers on FTS5).
CREATE VIRTUAL TABLE rvq_documents_fts USING fts5(document, content='rvq_vectors',
                                                  content_rowid='id');
