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
