"""SQLite and bytes: the connection, migrations, blob framing. No distance math here."""

from .blobs import (ORIGINAL_FORMATS, pack_block, pack_codebooks, pack_originals, unpack_block,
                    unpack_codebooks, unpack_originals)
from .db import Database, classify, translate_errors

__all__ = ["Database", "classify", "translate_errors", "ORIGINAL_FORMATS", "pack_block", "pack_codebooks", "pack_originals",
           "unpack_block", "unpack_codebooks", "unpack_originals"]
