"""The one error hierarchy of rvqstore.

Every error the library raises on purpose derives from :class:`RvqstoreError`;
where a builtin fits, the subclass also inherits it, so ``except ValueError``
keeps working for callers who do not know rvqstore.
"""


class RvqstoreError(Exception):
    """Root of every error rvqstore raises on purpose."""


class InvalidInputError(RvqstoreError, ValueError):
    """Input arrays or arguments are malformed (NaN, ragged, empty, wrong dtype, bad k)."""


class DimensionMismatchError(InvalidInputError):
    """Vectors have a different dimension from the store or codec."""


class NotTrainedError(RvqstoreError, RuntimeError):
    """An operation needs trained codebooks and there are none."""


class DuplicateError(InvalidInputError):
    """An id or key is given twice, or is already in the store."""


class UnknownIdError(RvqstoreError, KeyError):
    """Ids or keys asked for are not in the store."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EmptyStoreError(RvqstoreError, LookupError):
    """A search on a store with no vectors."""


class ConfigMismatchError(RvqstoreError, ValueError):
    """An argument to ``Store.open`` conflicts with the configuration stored in the file."""


class StoreClosedError(RvqstoreError, RuntimeError):
    """The store was used after ``close()``."""


class ReadOnlyError(RvqstoreError, PermissionError):
    """A write on a store opened read-only, or on a file that cannot be written."""


class BadFileError(RvqstoreError, OSError):
    """The file is not an rvqstore store, or it is truncated or corrupted."""


class SchemaTooNewError(BadFileError):
    """The file was written by a newer rvqstore; it is refused and left untouched."""


class OriginalsMissingError(RvqstoreError, RuntimeError):
    """The operation needs the original vectors and the store does not keep them."""


class StorageError(RvqstoreError, OSError):
    """The file could not be read or written (an I/O error, or another SQLite failure)."""


class DiskFullError(StorageError):
    """A write did not fit on the disk (or in the file's size limit); it was rolled back."""


class LockedError(StorageError, TimeoutError):
    """Another connection held the file's write lock for longer than the store waits."""
