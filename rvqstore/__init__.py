"""rvqstore: a persistent embedded vector store on residual vector quantization.

The errors are imported with the package; the other names when first used (PEP 562), so
that ``import rvqstore`` and the command line's ``--help`` load neither numpy nor numba.
"""

import importlib
from typing import TYPE_CHECKING

from .errors import (BadFileError, ConfigMismatchError, DimensionMismatchError, DiskFullError,
                     DuplicateError, EmptyStoreError, InvalidInputError, LockedError,
                     NotTrainedError, OriginalsMissingError, ReadOnlyError, RvqstoreError,
                     SchemaTooNewError, StorageError, StoreClosedError, UnknownIdError)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .algo import ProductQuantizer, ResidualQuantizer, SearchResult
    from .cache import EmbeddingCache
    from .store import Store

__version__ = "0.1.0"

__all__ = ["Store", "EmbeddingCache", "SearchResult", "ResidualQuantizer", "ProductQuantizer",
           "RvqstoreError", "InvalidInputError", "DimensionMismatchError", "DuplicateError",
           "UnknownIdError", "EmptyStoreError", "ConfigMismatchError", "StoreClosedError",
           "ReadOnlyError", "BadFileError", "SchemaTooNewError", "NotTrainedError",
           "OriginalsMissingError", "StorageError", "DiskFullError", "LockedError",
           "__version__"]

_LAZY = {"Store": ".store", "EmbeddingCache": ".cache", "SearchResult": ".algo",
         "ResidualQuantizer": ".algo", "ProductQuantizer": ".algo"}
# modules an eager ``import rvqstore`` used to load: still reachable as its attributes
_SUBMODULES = ("algo", "cache", "filters", "storage", "store")


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
