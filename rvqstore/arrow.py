"""Arrow tables and Parquet files in and out (optional extra: ``pip install 'rvqstore[arrow]'``).

pyarrow is imported when one of these functions runs, never by ``import rvqstore``.

The table of a store has one row per stored vector, in id order:

=========  ====================================  ==========================================
column     Arrow type                            holds
=========  ====================================  ==========================================
id         int64                                 the store's id
key        string (null: no key)                 the item's key
vector     fixed_size_list<float32>[dim]         the original vector
metadata   string (null: none)                   the item's metadata as a JSON object
document   string (null: none)                   the item's document
=========  ====================================  ==========================================

Reading (``rvqstore add FILE.parquet``, :func:`read_batches`) takes a ``vector`` column of
fixed-size or variable lists of numbers (``embedding`` is accepted too) and, when present,
``id`` (integers), ``key`` and ``document`` (strings) and ``metadata`` (JSON text or a
struct), batch by batch: a file of any length never sits in memory whole.
"""

import json

import numpy as np

from .errors import InvalidInputError
from .filters import validate_metadata
from .inputs import Loaded

VECTOR_COLUMNS = ("vector", "embedding")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("Arrow and Parquet need pyarrow: pip install 'rvqstore[arrow]'") \
            from None
    return pyarrow


def schema(dim):
    """The Arrow schema of a store's table (see the module docstring)."""
    pa = _pyarrow()
    return pa.schema([("id", pa.int64()), ("key", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim)),
                      ("metadata", pa.string()), ("document", pa.string())])


def record_batches(store, *, batch_size=8192):
    """Yield the store's table as ``pyarrow.RecordBatch`` es of ``batch_size`` rows (each
    read as of one commit, as :meth:`Store.iter`)."""
    pa = _pyarrow()
    dim = store.dim or 0
    out = schema(dim)
    for ids, keys, vecs, metas, docs in store.iter(batch_size=batch_size, with_metadata=True,
                                                   with_documents=True):
        flat = pa.array(np.ascontiguousarray(vecs, np.float32).reshape(-1), pa.float32())
        yield pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.int64()), pa.array(keys, pa.string()),
             pa.FixedSizeListArray.from_arrays(flat, dim),
             pa.array([None if m is None else json.dumps(m, ensure_ascii=False)
                       for m in metas], pa.string()),
             pa.array(docs, pa.string())], schema=out)


def to_arrow(store, *, batch_size=8192):
    """The store's table as one ``pyarrow.Table``."""
    pa = _pyarrow()
    return pa.Table.from_batches(list(record_batches(store, batch_size=batch_size)),
                                 schema=schema(store.dim or 0))


def write_parquet(store, path, *, batch_size=8192, progress=None):
    """Write the store's table to the Parquet file ``path``, batch by batch;
    ``progress(phase, done, total)`` as for the Store's long calls."""
    pa = _pyarrow()
    total = len(store)
    done = 0
    with pa.parquet.ParquetWriter(path, schema(store.dim or 0)) as writer:
        for batch in record_batches(store, batch_size=batch_size):
            writer.write_batch(batch)
            done += batch.num_rows
            if progress is not None:
                progress("export", done, total)
    return done


def row_count(path):
    """Rows in the Parquet file ``path`` (from its footer)."""
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"{path} is not a Parquet file ({exc})") from None


def read_batches(source, *, batch_size=65536):
    """Yield :class:`~rvqstore.inputs.Loaded` batches of the Parquet file ``source`` (a
    path) or of an Arrow table; bad columns and values are an ``InvalidInputError`` naming
    the column (and the row, counted from 0 over the whole file)."""
    pa = _pyarrow()
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        name = "the Arrow table"
        batches = source.to_batches(max_chunksize=batch_size) \
            if isinstance(source, pa.Table) else [source]
        names = source.schema.names
    else:
        name = str(source)
        try:
            parquet = pa.parquet.ParquetFile(source)
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(f"{name} is not a Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        batches = parquet.iter_batches(batch_size=batch_size)
    column = next((c for c in VECTOR_COLUMNS if c in names), None)
    if column is None:
        raise InvalidInputError(f"{name} has no vector column (one of "
                                f"{', '.join(VECTOR_COLUMNS)}); its columns: {', '.join(names)}")
    start = 0
    for batch in batches:
        yield _loaded(pa, batch, column, name, start)
        start += batch.num_rows


def _loaded(pa, batch, column, name, start):
    vec = batch.column(column)
    if not (pa.types.is_fixed_size_list(vec.type) or pa.types.is_list(vec.type)
            or pa.types.is_large_list(vec.type)) or not (
            pa.types.is_floating(vec.type.value_type) or pa.types.is_integer(vec.type.value_type)):
        raise InvalidInputError(f"{name}: column {column!r} must be lists of numbers, "
                                f"got {vec.type}")
    if vec.null_count:
        bad = start + next(i for i, v in enumerate(vec.is_null().to_pylist()) if v)
        raise InvalidInputError(f"{name}: row {bad} has no {column}")
    lengths = np.asarray(vec.value_lengths()) if not pa.types.is_fixed_size_list(vec.type) \
        else np.full(len(vec), vec.type.list_size)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = start + int(np.flatnonzero(lengths != lengths[0])[0])
        raise InvalidInputError(f"{name}: row {bad} has {int(lengths[bad - start])} "
                                f"numbers in {column!r}, the first row {int(lengths[0])}")
    dim = int(lengths[0]) if len(lengths) else 0
    values = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32)
    vectors = values.reshape(len(vec), dim)
    names = batch.schema.names
    ids = keys = metadata = documents = None
    if "id" in names:
        col = batch.column("id")
        if not pa.types.is_integer(col.type) or col.null_count:
            raise InvalidInputError(f"{name}: column 'id' must be integers without nulls, "
                                    f"got {col.type}")
        ids = np.asarray(col.to_numpy(), np.int64)
    if "key" in names:
        keys = _strings(pa, batch.column("key"), "key", name)
    if "document" in names:
        documents = _strings(pa, batch.column("document"), "document", name)
        if all(d is None for d in documents):
            documents = None
    if "metadata" in names:
        col = batch.column("metadata")
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            metadata = []
            for i, text in enumerate(col.to_pylist()):
                try:
                    value = None if text is None else json.loads(text)
                except ValueError as exc:
                    raise InvalidInputError(f"{name}: row {start + i} metadata is not JSON "
                                            f"({exc})") from None
                metadata.append(value)
        elif pa.types.is_struct(col.type) or pa.types.is_map(col.type):
            metadata = col.to_pylist()
            if pa.types.is_map(col.type):
                metadata = [None if m is None else dict(m) for m in metadata]
        else:
            raise InvalidInputError(f"{name}: column 'metadata' must be JSON text or a "
                                    f"struct, got {col.type}")
        for i, meta in enumerate(metadata):
            try:
                metadata[i] = validate_metadata(meta)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{name}: row {start + i}: {exc}") from None
        if all(m is None for m in metadata):
            metadata = None
    return Loaded(vectors, ids, keys, metadata, documents)


def _strings(pa, col, column, name):
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_null(col.type)):
        raise InvalidInputError(f"{name}: column {column!r} must be text, got {col.type}")
    return col.to_pylist()


def add_batches(store, source, *, upsert=False, skip_existing_keys=False, progress=None,
                batches=None):
    """Add (or with ``upsert``, upsert by key) the rows of a Parquet file or Arrow table
    ``source`` to ``store``, one transaction per batch of :func:`read_batches`, so that a
    file of any length never sits in memory whole; a batch that fails leaves the earlier
    ones stored. ``progress(phase, done, total)`` after each batch. ``batches``: the
    batches already begun (what :func:`read_batches` yielded, the rest to come). Returns
    the rows read."""
    pa = _pyarrow()
    if batches is None:
        batches = read_batches(source)
    total = source.num_rows if isinstance(source, (pa.Table, pa.RecordBatch)) \
        else row_count(source)
    rows = 0
    for batch in batches:
        if upsert and batch.keys is None:
            raise InvalidInputError(f"{source if isinstance(source, str) else 'the rows'}: "
                                    "an upsert replaces by key and the rows have no keys")
        if upsert:
            store.upsert(batch.vectors, keys=batch.keys, metadata=batch.metadata,
                         documents=batch.documents)
        else:
            store.add(batch.vectors, ids=batch.ids, keys=batch.keys, metadata=batch.metadata,
                      documents=batch.documents, skip_existing_keys=skip_existing_keys)
        rows += len(batch.vectors)
        if progress is not None:
            progress("add", rows, total)
    return rows
