"""Property tests (hypothesis) for the byte formats and for input validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rvqstore.algo.validate import as_matrix
from rvqstore.errors import BadFileError, InvalidInputError
from rvqstore.storage import (pack_block, pack_codebooks, pack_originals, unpack_block,
                              unpack_codebooks, unpack_originals)

finite = st.floats(-2.0 ** 100, 2.0 ** 100, allow_nan=False, allow_infinity=False, width=32)
shapes = st.tuples(st.integers(1, 20), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=finite), st.sampled_from(["float32", "zstd"]))
def test_originals_round_trip_exactly(x, fmt):
    blobs = pack_originals(x, fmt)
    assert len(blobs) == len(x)
    np.testing.assert_array_equal(unpack_originals(blobs, fmt, x.shape[1]), x)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=st.floats(-6e4, 6e4, width=32)))
def test_float16_originals_round_to_nearest_half(x):
    back = unpack_originals(pack_originals(x, "float16"), "float16", x.shape[1])
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 50), st.integers(1, 32), st.data())
def test_code_blocks_round_trip_and_refuse_wrong_sizes(n, stages, data):
    ids = data.draw(arrays(np.int64, n, elements=st.integers(0, 2**63 - 1)))
    codes = data.draw(arrays(np.uint8, (n, stages)))
    norms = data.draw(arrays(np.float32, n, elements=finite))
    blobs = pack_block(ids, codes, norms)
    got = unpack_block(n, stages, *blobs)
    for a, b in zip(got, (ids, codes, norms)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(BadFileError, match="corrupted"):
        unpack_block(n + 1, stages, *blobs)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 6)),
              elements=finite))
def test_codebooks_round_trip(c):
    np.testing.assert_array_equal(unpack_codebooks(pack_codebooks(c), *c.shape), c)
    with pytest.raises(BadFileError):
        unpack_codebooks(pack_codebooks(c)[:-1], *c.shape)


@settings(max_examples=100, deadline=None)
@given(st.one_of(
    arrays(st.sampled_from([np.float32, np.float64, np.float16]), shapes,
           elements=st.floats(-1e3, 1e3, allow_nan=False, width=16)),
    arrays(np.int32, shapes, elements=st.integers(-1000, 1000))))
def test_valid_matrices_are_accepted_as_float32(x):
    out = as_matrix(x, dim=x.shape[1])
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == x.shape


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, shapes, elements=st.floats(allow_nan=True, allow_infinity=True)))
def test_non_finite_values_are_always_refused(x):
    with np.errstate(over="ignore"):
        fits = np.isfinite(x.astype(np.float32)).all()
    if fits:
        as_matrix(x)
    else:
        with pytest.raises(InvalidInputError, match="NaN or inf"):
            as_matrix(x)


@given(st.lists(st.lists(st.floats(-1, 1), min_size=1, max_size=5), min_size=2, max_size=5))
def test_ragged_lists_are_refused_and_even_ones_accepted(rows):
    if len({len(r) for r in rows}) > 1:
        with pytest.raises(InvalidInputError, match="ragged"):
            as_matrix(rows)
    else:
        assert as_matrix(rows).shape == (len(rows), len(rows[0]))
