"""rvqstore: a persistent embedded vector store on residual vector quantization."""

from .algo import ProductQuantizer, ResidualQuantizer, SearchResult
from .errors import DimensionMismatchError, InvalidInputError, NotTrainedError, RvqstoreError

__version__ = "0.1.0"

__all__ = ["ResidualQuantizer", "ProductQuantizer", "SearchResult", "RvqstoreError",
           "InvalidInputError", "DimensionMismatchError", "NotTrainedError", "__version__"]
