"""The command line, ``rvqstore COMMAND DB ...``: a thin click layer over :class:`Store`.

Errors the library raises on purpose (every :class:`RvqstoreError`, malformed input files
included), and file and SQLite errors that escape it (a full disk, a denied permission),
become one line, ``Error: ...``, with exit code 1, in :meth:`_Group.invoke` and nowhere
else; click's usage errors exit with 2. Programming errors keep their traceback.

Tables escape control characters (``\\x1b``) in what they show, so that a stored key cannot
drive the terminal, and shorten metadata and documents; ``--json`` and ``--csv`` print
every string as stored (metadata as JSON objects, in CSV as a cell of JSON text).

Each command is a new process, so this module imports only click at the top: numpy, the
store, the input readers and tabulate are imported by the commands that use them, and
numba by the library when a command runs a kernel (search, train). ``--help`` and the
commands that only read a store (info, get, count) never load numba.
"""

import contextlib
import csv
import io
import itertools
import json
import os
import sqlite3
import sys
import time

import click

from . import __version__
from .errors import BadFileError, InvalidInputError, RvqstoreError

# The values the options take, as the library names them (rvqstore.store.METRICS and
# ORIGINAL_FORMATS, rvqstore.inputs.FORMATS and MAX_ID; a test checks that they agree):
# written here, since importing them would load numpy and sqlite-utils for --help.
METRICS = ("l2", "ip", "cosine")
ORIGINAL_FORMATS = ("float32", "float16", "zstd")
FORMATS = ("npy", "fvecs", "jsonl", "csv", "parquet")
MAX_ID = 2**63 - 2


class _Group(click.Group):
    """The one place where errors become ``Error: ...`` and exit code 1.

    Every command runs inside :meth:`invoke`; an error that does not name its file is
    prefixed with the file the command was working on, which the ``DB`` argument and
    :func:`_output_file` record in ``ctx.meta`` (shared by the group and its command).
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RvqstoreError as exc:
            raise _error(str(exc)) from None
        except ImportError as exc:  # an optional extra not installed: say which
            if "pip install 'rvqstore[" not in str(exc):
                raise
            raise _error(str(exc)) from None
        except BrokenPipeError:  # `rvqstore export vecs.db | head`: click exits quietly
            raise
        except OSError as exc:  # output files, and the safety net under the library
            where = exc.filename or ctx.meta.get(_OUTPUT) or ctx.meta.get(_DB)
            raise _error(exc.strerror or str(exc), where) from None
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # sqlite3 used wrongly: a bug, which keeps its traceback
        except sqlite3.Error as exc:  # the safety net: disk full, locked, corrupted
            raise _error(str(exc), ctx.meta.get(_DB)) from None


_DB, _OUTPUT = "rvqstore.db", "rvqstore.output"


def _error(message, where=None):
    """``Error: [where: ]message`` on one line."""
    return click.ClickException(_printable(f"{where}: {message}" if where else message))


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def _printable(text):
    """``text`` with control characters (C0, DEL, C1) written as escapes, ``\\x1b``."""
    return text.translate(_ESCAPES)


class _VectorType(click.ParamType):
    """A JSON array of numbers given on the command line."""

    name = "JSON"

    def convert(self, value, param, ctx):
        import numpy as np

        from .inputs import parse_vector

        if isinstance(value, np.ndarray):
            return value
        try:
            return parse_vector(value, name="the query")
        except InvalidInputError as exc:
            self.fail(str(exc), param, ctx)


class _WhereType(click.ParamType):
    """A metadata filter given as a JSON object; the library checks its operators."""

    name = "JSON"

    def convert(self, value, param, ctx):
        from .inputs import parse_object

        if isinstance(value, dict):
            return value
        try:
            return parse_object(value, name="the filter")
        except InvalidInputError as exc:
            self.fail(str(exc), param, ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 80})
@click.version_option(__version__, "--version", prog_name="rvqstore")
@click.option("--timeout", type=click.FloatRange(0, 86400), default=10.0, show_default=True,
              envvar="RVQSTORE_TIMEOUT", metavar="SECONDS",
              help="How long to wait for another connection's write lock.")
@click.pass_context
def main(ctx, timeout):
    """rvqstore: a vector store in one SQLite file (RVQ codes, ADC search, exact rerank).

    Every command takes the store file first, then its arguments:

    \b
        rvqstore create vecs.db --dim 384
        rvqstore add vecs.db vectors.npy --train
        rvqstore search vecs.db --vector '[0.1, 0.2, ...]' -k 5
    """


# -- shared options and helpers -------------------------------------------------------------

def _db(f):
    return click.argument("db", type=click.Path(dir_okay=False), callback=_remember_db)(f)


def _remember_db(ctx, param, value):
    ctx.meta[_DB] = value
    return value


_ID = click.IntRange(0, MAX_ID)


def _where(help):
    return click.option("--where", type=_WhereType(), metavar="JSON", help=help)


def _with_extras(f):
    f = click.option("--with-documents", is_flag=True, help="Show the results' documents.")(f)
    return click.option("--with-metadata", is_flag=True, help="Show the results' metadata.")(f)


def _output(f):
    f = click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _quiet(f):
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bar (there is none when stderr is not a terminal).")(f)


def _format(as_json, as_csv):
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    return "json" if as_json else "csv" if as_csv else "table"


@contextlib.contextmanager
def _removed_on_error(db):
    """A store file that this command creates is removed again if the command fails, so
    that a refused ``add`` of a bad input file to a new path leaves nothing behind."""
    new = not os.path.exists(db)
    try:
        yield
    except BaseException:
        if new:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(db + suffix)
        raise


def _open(db, *, readonly=False, create=False, **config):
    """Open a store; only ``create`` (and ``add``) make a new file."""
    from .store import Store

    ctx = click.get_current_context(silent=True)
    timeout = ctx.find_root().params.get("timeout", 10.0) if ctx is not None else 10.0
    return Store.open(db, readonly=readonly, create=create, timeout=timeout, **config)


class _Progress:
    """``progress(phase, done, total)`` drawn by ``click.progressbar`` on stderr, one bar per
    phase, with the count, the rate and the time left; nothing when ``enabled`` is false.
    Leaving the ``with`` block ends the bar's line, also when the command fails."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.bar = None
        self.bars = contextlib.ExitStack()  # the open bar's context, ended by close()
        self.phase = None
        self.done = 0

    @classmethod
    def for_terminal(cls, quiet):
        return cls(not quiet and sys.stderr.isatty())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, phase, done, total):
        if not self.enabled:
            return
        if phase != self.phase or done < self.done:  # a new phase, or the same one again
            self.close()
            self.phase, self.first, self.start = phase, done, time.monotonic()
            self.done, self.total = done, total
            self.bar = self.bars.enter_context(click.progressbar(
                length=total, label=f"{phase:<10}", bar_template="%(label)s [%(bar)s] %(info)s",
                width=24, empty_char="-", show_eta=False, show_percent=False,
                item_show_func=lambda _: self._info(), file=sys.stderr, update_min_steps=0))
        elif self.bar is None:
            return  # finished
        self.done = done
        self.bar.update(done - self.bar.pos)  # drawn on every call: the rate moves
        if done >= total:
            self.close()

    def _info(self):
        """The count, the rate since the phase began and the time left at that rate."""
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        rate_text = f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"
        return f"{self.done:,}/{self.total:,}  {rate_text}/s  ETA {left}"

    def close(self):
        self.bars.close()
        self.bar = None


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _count(n, what="vector"):
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _f32(x):
    """The shortest decimal that reads back as the same float32."""
    import numpy as np

    return float(str(np.float32(x)))


def _vector(vec):
    return [float(s) for s in vec.astype(str)]


_LONG = ("metadata", "document")  # columns whose text a table cuts to _WIDTH characters
_WIDTH = 40


def _cut(text, width=_WIDTH):
    return text if len(text) <= width else text[:width - 3] + "..."


def _cell(value, thousands=False):
    if value is None:
        return ""
    if isinstance(value, dict):  # metadata
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if thousands else str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):  # a vector: its ends, the full one with --json or --csv
        shown = [f"{v:.4g}" for v in value[:4]]
        if len(value) > 5:
            shown.append("...")
        shown += [f"{v:.4g}" for v in value[4:][-1:]]
        return "[" + ", ".join(shown) + "]"
    return str(value)


def _emit(rows, columns, fmt, *, thousands=False, formats=None):
    """Print ``rows`` (dicts) as an aligned table, a JSON array or CSV.

    ``formats`` maps a column to a format string for its cells in the table."""
    if fmt == "json":
        click.echo("[" + ",\n ".join(json.dumps(r) for r in rows) + "]")
    elif fmt == "csv":
        header = []
        for c in columns:
            vec = rows[0].get(c) if rows else None
            header += [f"v{i}" for i in range(len(vec))] if isinstance(vec, list) else [c]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            cells = []
            for c in columns:
                v = r.get(c)
                if isinstance(v, dict):
                    v = json.dumps(v, ensure_ascii=False)
                cells += v if isinstance(v, list) else ["" if v is None else v]
            writer.writerow(cells)
        click.echo(buf.getvalue(), nl=False, color=True)  # as stored: no ANSI stripping
    else:
        import tabulate

        tabulate.MIN_PADDING = 0  # a column as wide as its widest cell or name, not name + 2
        formats = formats or {}
        cells = [[_printable(formats[c].format(r[c]) if c in formats and r.get(c) is not None
                             else _cut(_cell(r.get(c), thousands)) if c in _LONG
                             else _cell(r.get(c), thousands)) for c in columns] for r in rows]
        right = [all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     for v in (r.get(c) for r in rows) if v is not None) for c in columns]
        click.echo(tabulate.tabulate(cells, columns, tablefmt="simple", disable_numparse=True,
                                     colalign=["right" if r else "left" for r in right],
                                     preserve_whitespace=True))


def _emit_mapping(mapping, fmt):
    """Print a dict: indented JSON, or field/value rows (nested dicts as ``a.b``)."""
    if fmt == "json":
        click.echo(json.dumps(mapping, indent=2))
        return
    flat = []
    for name, value in mapping.items():
        if isinstance(value, dict):
            flat += [{"field": f"{name}.{k}", "value": v} for k, v in value.items()]
        else:
            flat.append({"field": name, "value": value})
    _emit(flat, ["field", "value"], fmt, thousands=True)


def _rows_for(store, ids, vectors):
    """Rows of id, key and vector, with metadata and document where an item has them."""
    keys, metas, docs = store.keys(ids), store.metadata(ids), store.documents(ids)
    rows = []
    for i, k, v, m, d in zip(ids, keys, vectors, metas, docs):
        row = {"id": int(i), "key": k, "vector": _vector(v)}
        row.update(_present(metadata=m, document=d))
        rows.append(row)
    return rows


def _present(**fields):
    """The fields that are not None: an item without metadata shows no metadata field."""
    return {name: value for name, value in fields.items() if value is not None}


def _with_long(rows):
    """The metadata and document columns that some row has."""
    return [c for c in _LONG if any(c in r for r in rows)]


# -- commands -------------------------------------------------------------------------------

@main.command()
@_db
@click.option("--dim", type=int, metavar="N",
              help="Vector dimension [default: taken from the first add].")
@click.option("--metric", type=click.Choice(METRICS),
              help="Distance: squared L2, inner product or cosine [default: l2].")
@click.option("--stages", type=int, metavar="N",
              help="RVQ stages, code bytes per vector [default: 16].")
@click.option("--codebook-size", type=int, metavar="K",
              help="Codewords per stage, 2-256 [default: 256].")
@click.option("--originals", type=click.Choice(ORIGINAL_FORMATS),
              help="How originals are kept for rerank and get [default: float32].")
@click.option("--no-originals", is_flag=True,
              help="Drop the originals at the first training: smaller, no rerank, get, "
                   "retrain or export after it.")
def create(db, dim, metric, stages, codebook_size, originals, no_originals):
    """Create a new, empty store."""
    if os.path.exists(db):
        raise BadFileError(f"{db} already exists")
    with _removed_on_error(db), _open(db, create=True, dim=dim, metric=metric, stages=stages,
                                      codebook_size=codebook_size, originals=originals,
                                      keep_originals=False if no_originals else None) as store:
        c = store.config
        kept = c.originals if c.keep_originals else "dropped at training"
        dim = f"dim={c.dim}" if c.dim else "dim from the first add"
        click.echo(f"Created {db}: {dim}, metric={c.metric}, "
                   f"{c.stages} stages x {c.codebook_size} codewords, originals {kept}")


@main.command()
@_db
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Format of FILE [default: from the extension; JSON lines or CSV on stdin].")
@click.option("--train", is_flag=True,
              help="Train after adding (on a trained store: retrain).")
@click.option("--skip-existing-keys", is_flag=True,
              help="Skip rows whose key is already stored instead of refusing them.")
@click.option("--upsert", is_flag=True,
              help="Replace the items whose key is stored (vector, metadata, document; "
                   "the id stays) and add the rest. Needs keys, takes no ids.")
@_quiet
def add(db, file, fmt, train, skip_existing_keys, upsert, quiet):
    """Add the vectors of FILE (npy, fvecs, jsonl, csv, parquet; - for stdin).

    JSON lines: {"id": 7, "key": "doc-7", "vector": [...], "metadata": {...},
    "document": "..."} per line, all but vector optional. CSV: numbers only, or a
    header whose id, key, metadata (a JSON object per cell) and document columns are
    taken as such and whose other columns are the vector. The store is created if
    missing. All rows go in one transaction, except from Parquet (pyarrow needed):
    a vector or embedding column of lists of numbers, optional id, key, metadata
    (JSON text or struct) and document columns, added 65,536 rows per transaction.
    """
    from .inputs import format_for, read_vectors

    if upsert and skip_existing_keys:
        raise click.UsageError("give --upsert or --skip-existing-keys, not both")
    if (fmt or (None if file == "-" else format_for(file))) == "parquet":
        return _add_parquet(db, file, train, skip_existing_keys, upsert, quiet)
    loaded = read_vectors(file, format=fmt)
    name = "<stdin>" if file == "-" else file
    if upsert and loaded.keys is None:
        raise InvalidInputError(f"{name}: --upsert replaces by key and the rows have no keys")
    if upsert and loaded.ids is not None:
        raise InvalidInputError(f"{name}: --upsert keeps the stored ids and numbers new "
                                "items itself; the rows give ids")
    with _Progress.for_terminal(quiet) as progress:
        with _removed_on_error(db):
            store = _open(db, create=True)
            try:
                before = len(store)
                t = time.perf_counter()
                if upsert:
                    store.upsert(loaded.vectors, keys=loaded.keys, metadata=loaded.metadata,
                                 documents=loaded.documents, progress=progress)
                else:
                    store.add(loaded.vectors, ids=loaded.ids, keys=loaded.keys,
                              metadata=loaded.metadata, documents=loaded.documents,
                              skip_existing_keys=skip_existing_keys, progress=progress)
            except BaseException:
                store.close()
                raise
        with store:  # a failed --train keeps the vectors added
            _added(store, db, len(loaded.vectors), before, t, upsert, train, progress)


def _added(store, db, rows, before, t, upsert, train, progress):
    """Report an add of ``rows`` rows to ``store`` (``before`` vectors at time ``t``), then
    train when asked."""
    progress.close()
    after = len(store)
    skipped = rows - (after - before)
    note = (f", replaced {skipped:,} already stored" if upsert and skipped
            else f", skipped {skipped:,} already stored" if skipped else "")
    click.echo(f"Added {_count(after - before)} to {db}{note} in "
               f"{time.perf_counter() - t:.2f} s ({after:,} in the store)")
    if train:
        _train(store, db, store.train, progress, "Trained")


def _add_parquet(db, file, train, skip_existing_keys, upsert, quiet):
    """``add`` of a Parquet file, batch by batch (each batch one transaction): a file of
    any length never sits in memory whole."""
    from . import arrow

    if file == "-":
        raise click.UsageError("Parquet is read from a file, not standard input")
    t = time.perf_counter()
    file = str(file)
    batches = arrow.read_batches(file)
    first = next(batches, None)  # the file's columns are checked before a store is made
    if first is None:
        raise InvalidInputError(f"{file} holds no rows")
    with _removed_on_error(db):
        store = _open(db, create=True)
    with store, _Progress.for_terminal(quiet) as progress:
        before = len(store)
        rows = arrow.add_batches(store, file, upsert=upsert,
                                 skip_existing_keys=skip_existing_keys, progress=progress,
                                 batches=itertools.chain([first], batches))
        _added(store, db, rows, before, t, upsert, train, progress)


def _train(store, db, method, progress, verb):
    t = time.perf_counter()
    info = method(progress=progress)
    progress.close()
    click.echo(f"{verb} {db} in {time.perf_counter() - t:.1f} s: codebook version "
               f"{info['codebook_version']}, {info['count']:,} vectors, "
               f"train MSE {info['train_mse']:.4g}")


@main.command()
@_db
@_quiet
def train(db, quiet):
    """Fit the codebooks and encode every vector.

    Until then search is exact. On a trained store this retrains.
    """
    with _open(db) as store, _Progress.for_terminal(quiet) as progress:
        _train(store, db, store.train, progress, "Trained")


@main.command()
@_db
@_quiet
def retrain(db, quiet):
    """Fit new codebooks, re-encode, switch atomically.

    Searches keep using the old codebooks until the switch.
    """
    with _open(db) as store, _Progress.for_terminal(quiet) as progress:
        _train(store, db, store.retrain, progress, "Retrained")


@main.command()
@click.argument("db", type=click.Path(), callback=_remember_db)
@click.argument("queryfile", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--vector", "vector", type=_VectorType(), help="The query as a JSON array.")
@click.option("--key", metavar="KEY", help="Query with the stored vector of this key.")
@click.option("--id", "id_", type=_ID, metavar="ID",
              help="Query with the stored vector of this id.")
@click.option("-k", "k", type=int, default=10, metavar="K", show_default=True,
              help="Results per query.")
@click.option("--rerank", type=int, metavar="N",
              help="Rerank k x N candidates exactly; 1: codes alone [default: as deep as the "
                   "codes' error requires].")
@click.option("--nprobe", type=int, metavar="N",
              help="A partitioned store (200,000 vectors or more) scans the codes of the "
                   "cells nearest each query, N average cells' worth [default: the store's "
                   "calibrated nprobe, see info].")
@click.option("--stages", type=int, metavar="S",
              help="Rank the codes by their first S stages only [default: all].")
@click.option("--exclude-self", is_flag=True,
              help="With --key or --id: leave the item itself out of its results.")
@_where("Only items whose metadata passes this filter, a JSON object such as "
        '\'{"year": {"$gte": 2024}}\'.')
@click.option("--text", metavar="TEXT",
              help="Hybrid search, with one query: fuse its ranking with a keyword search "
                   "of the documents for TEXT.")
@_with_extras
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Format of QUERYFILE [default: as for add].")
@_output
def search(db, queryfile, vector, key, id_, k, rerank, nprobe, stages, exclude_self, where,
           text, with_metadata, with_documents, fmt, as_json, as_csv):
    """The k nearest stored vectors of each query.

    Give the queries as QUERYFILE (any format add reads; - for stdin), or one query
    with --vector, or --key / --id to find what is like a stored item (the item
    itself is in its results unless --exclude-self). With --where, the k nearest
    among the items that pass the filter (MongoDB style: $eq $ne $gt $gte $lt $lte
    $in $nin $exists $contains $and $or $not).

    With --text, the results come in the order of reciprocal rank fusion of the
    vector ranking and the keyword ranking (as text-search finds it), with their
    vector distances; a distance is left blank (JSON: null) when the store keeps no
    originals to compute it for an item that only the text found.
    """
    from .inputs import read_vectors

    out = _format(as_json, as_csv)
    given = [n for n, v in (("QUERYFILE", queryfile), ("--vector", vector), ("--key", key),
                            ("--id", id_)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give one of QUERYFILE, --vector, --key or --id"
                               + (f", not {' and '.join(given)}" if given else ""))
    if exclude_self and key is None and id_ is None:
        raise click.UsageError("--exclude-self goes with --key or --id")
    if os.path.isdir(db):
        return _search_shards(db, queryfile, vector, k, rerank, nprobe, where, fmt, out,
                              dict(key=key, id=id_, stages=stages, text=text,
                                   with_metadata=with_metadata, with_documents=with_documents))
    with _open(db, readonly=True) as store:
        self_id = None
        if queryfile is not None:
            queries = read_vectors(queryfile, format=fmt).vectors
            if text is not None and len(queries) != 1:
                name = "<stdin>" if queryfile == "-" else queryfile
                raise click.UsageError(f"--text (hybrid search) takes one query; {name} "
                                       f"holds {len(queries):,}")
        elif vector is not None:
            queries = vector[None, :]
        else:
            self_id = int(store.ids_for_keys([key])[0]) if key is not None else id_
            queries = store.get([self_id])
        res = store.search(queries, k=k, rerank=rerank, nprobe=nprobe, stages=stages,
                           with_keys=True, where=where, text=text,
                           with_metadata=with_metadata, with_documents=with_documents,
                           exclude=[self_id] if exclude_self else None)
    rows = [{"query": q, **row} for q in range(len(queries))
            for row in _ranked(res, q, "distance", with_metadata, with_documents)]
    columns = _ranked_columns(["query", "rank", "id", "key", "distance"], rows, out,
                              with_metadata, with_documents)
    if out == "table" and len(queries) == 1:
        columns.remove("query")
    _emit(rows, columns, out, formats={"distance": "{:.4f}"})


def _search_shards(directory, queryfile, vector, k, rerank, nprobe, where, fmt, out, others):
    """search over a shard directory (rvqstore.shards.ShardedStore, threads over shards)."""
    from .inputs import read_vectors
    from .shards import ShardedStore

    unsupported = [f"--{n.replace('_', '-')}" for n, v in others.items() if v]
    if unsupported:
        raise click.UsageError(f"{', '.join(unsupported)}: not with a shard directory")
    queries = read_vectors(queryfile, format=fmt).vectors if queryfile is not None \
        else vector[None, :]
    with ShardedStore(directory) as shards:
        res = shards.search(queries, k=k, rerank=rerank, nprobe=nprobe, where=where,
                            with_keys=True)
    res = _Results(res.ids, res.distances, res.keys)
    rows = [{"query": q, **row} for q in range(len(queries))
            for row in _ranked(res, q, "distance", False, False)]
    columns = _ranked_columns(["query", "rank", "id", "key", "distance"], rows, out, False,
                              False)
    if out == "table" and len(queries) == 1:
        columns.remove("query")
    _emit(rows, columns, out, formats={"distance": "{:.4f}"})


class _Results:
    def __init__(self, ids, distances, keys):
        self.ids, self.distances, self.keys = ids, distances, keys
        self.metadata = self.documents = None


@main.command("text-search")
@_db
@click.argument("text")
@click.option("-k", "k", type=int, default=10, metavar="K", show_default=True,
              help="How many results.")
@_where("Only items whose metadata passes this filter, a JSON object such as "
        '\'{"year": {"$gte": 2024}}\'.')
@_with_extras
@_output
def text_search(db, text, k, where, with_metadata, with_documents, as_json, as_csv):
    """The k documents that best match TEXT (keyword search, no vectors).

    TEXT is read as plain words, any of which may match (no query syntax). Results
    come best first with their BM25 score from SQLite FTS5, where lower is better.
    """
    out = _format(as_json, as_csv)
    with _open(db, readonly=True) as store:
        res = store.text_search(text, k=k, where=where, with_keys=True,
                                with_metadata=with_metadata, with_documents=with_documents)
        rows = list(_ranked(res, None, "score", with_metadata, with_documents))
        if not rows and not store.info()["bytes"]["documents"]:
            raise _error(f"{db} holds no documents to search (add gives them from a "
                         "\"document\" field or column)")
    columns = _ranked_columns(["rank", "id", "key", "score"], rows, out, with_metadata,
                              with_documents)
    _emit(rows, columns, out, formats={"score": "{:.4f}"})


def _ranked(res, q, measure, with_metadata, with_documents):
    """The rows of query ``q`` of a SearchResult (``None``: a 1-D one), without padding:
    rank, id, key, ``measure`` (the distance, None where not finite) and the extras."""
    import numpy as np

    pick = (lambda a: a) if q is None else (lambda a: None if a is None else a[q])
    ids, dist, keys = pick(res.ids), pick(res.distances), pick(res.keys)
    metas, docs = pick(res.metadata), pick(res.documents)
    for r, j in enumerate(np.flatnonzero(ids >= 0), 1):
        row = {"rank": r, "id": int(ids[j]), "key": keys[j],
               measure: _f32(dist[j]) if np.isfinite(dist[j]) else None}
        if with_metadata:
            row["metadata"] = metas[j]
        if with_documents:
            row["document"] = docs[j]
        yield row


def _ranked_columns(columns, rows, out, with_metadata, with_documents):
    """``columns`` and the extras asked for; a table leaves out the key column when no
    result has a key."""
    columns = columns + ["metadata"] * with_metadata + ["document"] * with_documents
    if out == "table" and all(r["key"] is None for r in rows):
        columns.remove("key")
    return columns


@main.command()
@_db
@click.option("--id", "ids", type=_ID, multiple=True, metavar="ID", help="An id (repeatable).")
@click.option("--key", "keys", multiple=True, metavar="KEY", help="A key (repeatable).")
@_output
def get(db, ids, keys, as_json, as_csv):
    """Print stored vectors by id or key, with their metadata and documents.

    The table shows the ends of each vector and the start of each metadata and
    document; --json and --csv print all of them (--json: the metadata and document
    fields only for items that have them).
    """
    import numpy as np

    out = _format(as_json, as_csv)
    if bool(ids) == bool(keys):
        raise click.UsageError("give --id or --key (one or more), not both")
    with _open(db, readonly=True) as store:
        found = np.asarray(ids, np.int64) if ids else store.ids_for_keys(list(keys))
        rows = _rows_for(store, found, store.get(found))
    long = _with_long(rows)
    # CSV as export writes it (the vector last, so add reads it back); tables end in text
    columns = ["id", "key", *long, "vector"] if out == "csv" else ["id", "key", "vector", *long]
    _emit(rows, columns, out)


@main.command()
@_db
@click.option("--id", "ids", type=_ID, multiple=True, metavar="ID", help="An id (repeatable).")
@click.option("--key", "keys", multiple=True, metavar="KEY", help="A key (repeatable).")
@_where("Delete every item whose metadata passes this filter (a JSON object; '{}' "
        "deletes all).")
def delete(db, ids, keys, where):
    """Delete vectors by id, key or metadata filter, all or none.

    The space is freed by compact.
    """
    if sum(map(bool, (ids, keys, where is not None))) != 1:
        raise click.UsageError("give one of --id, --key (one or more) or --where")
    with _open(db) as store:
        n = (store.delete(list(ids)) if ids else store.delete(keys=list(keys)) if keys
             else store.delete(where=where))
        click.echo(f"Deleted {_count(n)} from {db} ({len(store):,} left)")


@main.command()
@_db
@_where("Count only the items whose metadata passes this filter (a JSON object).")
def count(db, where):
    """Print how many items the store holds, or how many pass --where."""
    with _open(db, readonly=True) as store:
        click.echo(store.count(where))


@main.command()
@_db
@_quiet
def compact(db, quiet):
    """Free the space of deleted vectors and shrink the file."""
    with _open(db) as store:
        size = sum(store.info()["bytes"][p] for p in ("file", "wal"))
        with _Progress.for_terminal(quiet) as progress:
            store.compact(progress=progress)
        now = sum(store.info()["bytes"][p] for p in ("file", "wal"))
        click.echo(f"Compacted {db}: {now:,} bytes on disk (was {size:,})")


@main.command()
@_db
@_output
def info(db, as_json, as_csv):
    """Counts, configuration, training state and bytes on disk by part."""
    with _open(db, readonly=True) as store:
        _emit_mapping(store.info(), _format(as_json, as_csv))


@main.command()
@_db
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="File to write [default: stdout].")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy", "csv", "parquet"]),
              help="jsonl, csv and parquet keep ids and keys and are read back by add; npy "
                   "holds the vectors only, in id order [default: from -o's extension, else "
                   "jsonl]. parquet needs pyarrow (pip install 'rvqstore[arrow]').")
@click.option("--quantized", type=click.Path(file_okay=False),
              help="Write the quantized form to this directory instead: codebooks.parquet "
                   "and codes.parquet (schema in rvqstore/arrow.py), read back by "
                   "'rvqstore import' without training. Needs pyarrow.")
@click.option("--no-vectors", is_flag=True,
              help="With --quantized: leave the originals out (codes alone).")
@click.option("--batch-size", type=int, default=8192, show_default=True, hidden=True)
@_quiet
def export(db, output, fmt, quantized, no_vectors, batch_size, quiet):
    """Write every stored vector with its id, key, metadata and document.

    JSON lines carry "metadata" and "document" fields on the items that have them;
    CSV has metadata (JSON text) and document columns when the store holds any.
    """
    import numpy as np

    if quantized is not None:
        if output != "-" or fmt:
            raise click.UsageError("--quantized writes a directory: give no -o or --format")
        with _open(db, readonly=True) as store, _Progress.for_terminal(quiet) as progress:
            n = store.export_quantized(quantized, with_vectors=False if no_vectors else None,
                                       progress=progress)
        click.echo(f"Exported {_count(n)} as codes to {quantized}")
        return
    if no_vectors:
        raise click.UsageError("--no-vectors goes with --quantized")
    fmt = fmt or {".npy": "npy", ".csv": "csv", ".parquet": "parquet"}.get(
        os.path.splitext(output)[1].lower(), "jsonl")
    if fmt in ("npy", "parquet") and output == "-":
        raise click.UsageError(f"--format {fmt} needs -o FILE")
    with _open(db, readonly=True) as store:
        if fmt == "parquet":
            from . import arrow

            with _output_file(output, "wb") as f, _Progress.for_terminal(False) as progress:
                arrow.write_parquet(store, f, batch_size=batch_size, progress=progress)
            return
        if fmt == "npy":
            batches = store.iter(batch_size=batch_size)
            parts = [vecs for _, _, vecs in batches] or [np.empty((0, store.dim), np.float32)]
            with _output_file(output, "wb") as f:
                np.save(f, np.concatenate(parts))
            return
        stored = store.info()["bytes"]
        long = [c for c, part in zip(_LONG, ("metadata", "documents")) if stored[part]]
        with _output_file(output, "w") as f:
            writer = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
            if writer:
                writer.writerow(["id", "key", *long]
                                + [f"v{i}" for i in range(store.dim or 0)])
            # each batch's keys, vectors, metadata and documents as of one commit
            batches = store.iter(batch_size=batch_size, with_metadata=True, with_documents=True)
            for ids, keys, vecs, metas, docs in batches:
                text = vecs.astype(str)
                for i, key, vec, meta, doc in zip(ids.tolist(), keys, text, metas, docs):
                    if writer:
                        extra = {"metadata": "" if meta is None else
                                 json.dumps(meta, ensure_ascii=False),
                                 "document": "" if doc is None else doc}
                        writer.writerow([i, "" if key is None else key,
                                         *(extra[c] for c in long), *vec])
                    else:
                        named = "" if key is None else f'"key": {json.dumps(key)}, '
                        more = "".join(f', "{c}": {json.dumps(v)}' for c, v in
                                       (("metadata", meta), ("document", doc)) if v is not None)
                        f.write(f'{{"id": {i}, {named}"vector": [{", ".join(vec)}]{more}}}\n')


@main.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@_db
@click.option("--no-originals", is_flag=True,
              help="Keep no originals even if the export has them (codes alone).")
@_quiet
def import_(source, db, no_originals, quiet):
    """Build a new store DB from a quantized export (export --quantized): the same ids,
    keys, codes, codebooks and training figures, so the same search results; no training,
    no encoding. DB must not exist."""
    from .store import Store

    if os.path.exists(db):
        raise click.UsageError(f"{db} exists: import builds a new store")
    options = {"keep_originals": False} if no_originals else {}
    t = time.perf_counter()
    with _Progress.for_terminal(quiet) as progress:
        store = Store.import_quantized(source, db, progress=progress, **options)
    with store:
        info = store.info()
    click.echo(f"Imported {_count(info['count'])} into {db} in "
               f"{time.perf_counter() - t:.2f} s: dim={info['dim']}, metric={info['metric']}, "
               f"{info['stages']} stages x {info['codebook_size']} codewords, "
               f"originals {'kept' if info['keep_originals'] else 'none'}")


@main.group()
def shard():
    """Sharded stores on Dask: build one from a Parquet dataset or a .npy file."""


@shard.command("build")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--scheduler", default="local", show_default=True, metavar="ADDRESS|local",
              help="A Dask scheduler's address, or local: a LocalCluster of --workers "
                   "processes on this machine.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              help="With --scheduler local: worker processes (one thread each).")
@click.option("--rows-per-shard", type=click.IntRange(1), metavar="N",
              help="For a .npy source: rows per shard [default: 65,536]. A Parquet "
                   "dataset's partitions are its shards.")
@click.option("--metric", type=click.Choice(METRICS), default="l2", show_default=True)
@click.option("--stages", type=click.IntRange(1, 64), default=16, show_default=True)
@click.option("--codebook-size", type=click.IntRange(2, 256), default=256, show_default=True)
@click.option("--no-originals", is_flag=True, help="Keep the codes alone (no rerank).")
@click.option("--sample", type=click.IntRange(1), default=65536, show_default=True,
              help="Vectors sampled to train the codebooks.")
@click.option("--seed", type=int, default=0, show_default=True)
@_quiet
def shard_build(source, out_dir, scheduler, workers, rows_per_shard, metric, stages,
                codebook_size, no_originals, sample, seed, quiet):
    """Train codebooks once on a sample of SOURCE (a Parquet file or dataset with a
    vector column, or a .npy file), encode every partition on the Dask workers, each
    writing its own shard store into OUT_DIR. Run it again to resume a build that
    stopped. rvqstore search OUT_DIR searches the shards as one store."""
    from . import dask as rdask

    src = source
    if source.endswith(".npy"):
        import dask.array as da
        import numpy as np

        src = da.from_array(np.load(source, mmap_mode="r"),
                            chunks=(rows_per_shard or 65536, -1))
        rows_per_shard = None
    t = time.perf_counter()
    client = rdask.connect(scheduler, workers=workers)
    try:
        with _Progress.for_terminal(quiet) as progress:
            manifest = rdask.build(src, out_dir, client=client, metric=metric, stages=stages,
                                   codebook_size=codebook_size,
                                   keep_originals=not no_originals, sample=sample, seed=seed,
                                   rows_per_shard=rows_per_shard, progress=progress)
    finally:
        client.close()
        cluster = getattr(client, "cluster", None)
        if scheduler == "local" and cluster is not None:
            cluster.close()
    click.echo(f"Built {len(manifest['shards'])} shards of {_count(manifest['count'])} in "
               f"{out_dir} in {time.perf_counter() - t:.1f} s")


def _output_file(path, mode):
    """``path`` opened for writing, or stdout for "-"; a file appears only when complete.
    A write error that does not name its file is then reported against ``path``."""
    click.get_current_context().meta[_OUTPUT] = "<stdout>" if path == "-" else path
    try:
        return click.open_file(path, mode, encoding=None if "b" in mode else "utf-8",
                               atomic=path != "-")
    except OSError as exc:  # name the file asked for, not click's temporary one
        raise OSError(exc.errno, exc.strerror, path) from None


@main.command()
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Use the first N base vectors (ground truth recomputed).")
@click.option("--queries", type=click.IntRange(min=1), metavar="N",
              help="Use the first N queries [default: all].")
@click.option("--stages", type=int, default=16, metavar="N", show_default=True,
              help="RVQ stages.")
@click.option("--codebook-size", type=int, default=256, metavar="K", show_default=True,
              help="Codewords per stage.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, metavar="N",
              show_default=True,
              help="Runs over the queries; QPS is their median.")
@_quiet
@_output
def bench(dataset_dir, limit, queries, stages, codebook_size, repeats, quiet, as_json, as_csv):
    """Measure recall and QPS on a dataset folder.

    Prints 10-recall@10 and single-query QPS at rerank 1, 4 and 10, with numba and
    BLAS limited to one thread (BLAS needs threadpoolctl; the threads are printed).
    DATASET_DIR holds base.npy, queries.npy and gt_l2.npy (exact neighbour ids, one
    row per query). The store is built in a temporary folder and removed after.
    """
    from . import benchmark

    out = _format(as_json, as_csv)
    data = benchmark.load_dataset(dataset_dir, limit=limit, queries=queries)
    with _Progress.for_terminal(quiet) as progress:
        result = benchmark.run(data, stages=stages, codebook_size=codebook_size,
                               repeats=repeats, progress=progress)
    if out == "json":
        click.echo(json.dumps({"dataset": dataset_dir, **result}, indent=2))
        return
    rows = [{"rerank": r["rerank"], "10-recall@10": round(r["recall_10_at_10"], 3),
             "QPS single": round(r["qps_single"])} for r in result["rows"]]
    _emit(rows, ["rerank", "10-recall@10", "QPS single"], out,
          formats={"10-recall@10": "{:.3f}", "QPS single": "{:,}"})
    if out == "table":
        r = result
        click.echo(f"\n{r['vectors']:,} vectors of dim {r['dim']}, {r['queries']:,} queries, "
                   f"{stages} stages x {codebook_size} codewords\n"
                   f"add {r['add_s']:.2f} s, train {r['train_s']:.1f} s, "
                   f"{r['file_bytes']:,} bytes on disk\n"
                   f"search: one query per call, {_threads(r['threads'])}, "
                   f"median of {repeats} runs")


def _threads(threads):
    """What ``bench`` ran its searches on, claiming one thread only where it was checked."""
    numba, blas = threads["numba"], threads["blas"]
    if numba == blas == 1:
        return "1 thread"
    blas = (f"BLAS {blas} thread{'s' * (blas != 1)}" if blas is not None
            else "BLAS threads unknown (threadpoolctl is not installed)")
    return f"numba {numba} thread{'s' * (numba != 1)}, {blas}"
