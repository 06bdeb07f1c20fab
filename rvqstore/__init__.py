"""rvqstore: a persistent embedded vector store on residual vector quantization."""

from .algo import ProductQuantizer, ResidualQuantizer, SearchResult
from .cache import EmbeddingCache
from .errors import (BadFileError, ConfigMismatchError, DimensionMismatchError, DiskFullError,
                     DuplicateError, EmptyStoreError, InvalidInputError, LockedError,
                     NotTrainedError, OriginalsMissingError, ReadOnlyError, RvqstoreError,
                     SchemaTooNewError, StorageError, StoreClosedError, UnknownIdError)
from .store import Store

__version__ = "0.1.0"

__all__ = ["Store", "EmbeddingCache", "SearchResult", "ResidualQuantizer", "ProductQuantizer",
           "RvqstoreError", "InvalidInputError", "DimensionMismatchError", "DuplicateError",
           "UnknownIdError", "EmptyStoreError", "ConfigMismatchError", "StoreClosedError",
           "ReadOnlyError", "BadFileError", "SchemaTooNewError", "NotTrainedError",
           "OriginalsMissingError", "StorageError", "DiskFullError", "LockedError",
           "__version__"]
