-- rvqstore schema 2: a CRC-32 of every code block's and codebook's BLOBs beside them
-- (-1 where none was written: such a row fails verification). Originals carry the CRC-32 of
-- their bytes in their last 4 bytes; the migration appends it to the rows stored before.

ALTER TABLE rvq_blocks ADD COLUMN checksum INTEGER NOT NULL DEFAULT -1;

ALTER TABLE rvq_codebooks ADD COLUMN checksum INTEGER NOT NULL DEFAULT -1;
