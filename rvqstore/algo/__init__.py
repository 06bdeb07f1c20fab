"""The math of rvqstore: k-means, RVQ/PQ codecs, ADC tables and scans, rerank.

Takes numpy arrays and callables; knows nothing of SQLite or files.
"""

from .kmeans import kmeans
from .quantizers import ProductQuantizer, ResidualQuantizer
from .search import SearchResult, adc_search, exact_search, normalize, rerank

__all__ = ["kmeans", "ResidualQuantizer", "ProductQuantizer", "SearchResult",
           "adc_search", "exact_search", "normalize", "rerank"]
