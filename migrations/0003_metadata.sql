-- rvqstore schema 3: per-vector metadata (a JSON object as text, NULL for none) and document
-- text, written in the same transaction as the vector. Filters evaluate the metadata from
-- typed in-memory columns; this table is the durable copy.

ALTER TABLE rvq_vectors ADD COLUMN metadata TEXT;

ALTER TABLE rvq_vectors ADD COLUMN document TEXT;
