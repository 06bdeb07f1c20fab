"""Additive quantizers: residual (RVQ) and product (PQ), sharing decode and lookup tables.

Both represent a vector as a sum of one codeword per stage (PQ's codewords are
zero outside their sub-space), so decoding, inner-product tables and stored
norms work the same way for both.
"""

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError
from .kmeans import assign, kmeans
from .validate import as_matrix, check_metric

kernels = None  # rvqstore.algo.kernels, once _kernels() has imported it


def _kernels():
    """The numba kernels, imported by the first call that runs one rather than with this
    module: opening and reading a store (info, get, count) never loads numba, whose import
    takes ~0.2 s a process. Kept in a module global, since an import statement in a
    function that runs for every query costs it a few microseconds."""
    global kernels
    if kernels is None:
        from . import kernels
    return kernels


def _report(progress, phase, done, total):
    if progress is not None:
        progress(phase, done, total)


def round_bf16(x):
    """float32 values rounded to the nearest bfloat16 (8-bit mantissa), kept as float32.

    Codebooks are stored this way: a query's lookup table then reads half the bytes
    (:func:`kernels.matvec_bf16`) while decode, norms and tables all see the same values, so
    ADC estimates stay exact-form. The rounding (relative 2**-9 per component) is far below
    the quantization error.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    top = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    return (top << 16).view(np.float32).reshape(np.shape(x))


def _check_codes(codes, S, K):
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != S:
        raise InvalidInputError(f"codes must have shape (n, {S}), got {codes.shape}")
    if codes.dtype != np.uint8:
        if codes.size and (codes.min() < 0 or codes.max() >= K):
            raise InvalidInputError(f"codes must lie in [0, {K}), got range [{codes.min()}, {codes.max()}]")
        codes = codes.astype(np.uint8)
    return np.ascontiguousarray(codes)


@dataclass(frozen=True, eq=False)
class ResidualQuantizer:
    """S stages of K <= 256 codewords each; a code is one uint8 per stage.

    Attributes
    ----------
    codebooks : float32 (S, K, d)
    """

    codebooks: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def stages(self):
        return self.codebooks.shape[0]

    @property
    def codebook_size(self):
        return self.codebooks.shape[1]

    @property
    def dim(self):
        return self.codebooks.shape[2]

    # -- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, x, *, stages=16, codebook_size=256, beam_width=1, refine_rounds=0,
              n_iter=20, seed=0, max_points_per_centroid=256, progressive_dim=False,
              progress=None):
        """Fit the codebooks stage by stage on the residuals of ``x``.

        Parameters
        ----------
        x : array-like of shape (n, d), the training sample (n >= codebook_size)
        stages : int in [1, 64]
        codebook_size : int in [2, 256]
        beam_width : int, beam used to encode the sample between stages, so each stage
            trains on the residuals the final encoder will leave
        refine_rounds : int, rounds of least-squares codebook refinement after training
        seed : int or numpy.random.Generator
        max_points_per_centroid : int, k-means subsample cap per stage
        progressive_dim : bool, use progressive-dimension k-means (see :func:`kmeans`)
        progress : callable(phase, done, total) or None

        Returns
        -------
        ResidualQuantizer
        """
        x = as_matrix(x, name="training vectors")
        if not 1 <= stages <= 64:
            raise InvalidInputError(f"stages must be in [1, 64], got {stages}")
        if not 2 <= codebook_size <= 256:
            raise InvalidInputError(f"codebook_size must be in [2, 256], got {codebook_size}")
        if x.shape[0] < codebook_size:
            raise InvalidInputError(
                f"training needs at least codebook_size={codebook_size} vectors, got {x.shape[0]}")
        if beam_width < 1:
            raise InvalidInputError(f"beam_width must be >= 1, got {beam_width}")
        rng = np.random.default_rng(seed)
        n, d = x.shape
        books = np.zeros((stages, codebook_size, d), dtype=np.float32)
        residual = x.copy()
        state = None
        for s in range(stages):
            _report(progress, "train", s, stages)
            books[s] = kmeans(residual, codebook_size, n_iter=n_iter, seed=rng,
                              max_points_per_centroid=max_points_per_centroid,
                              progressive_dim=progressive_dim)
            if beam_width == 1:
                labels, _ = assign(residual, books[s])
                residual -= books[s][labels]
            else:
                rq = cls(books[: s + 1].copy())
                state = rq._beam_stage(x, s, beam_width, state)
                residual = x - rq.decode(state[1][:, 0, : s + 1])
        _report(progress, "train", stages, stages)
        rq = cls(round_bf16(books))
        for r in range(refine_rounds):
            _report(progress, "refine", r, refine_rounds)
            rq = rq.refine(x, rq.encode(x, beam_width=beam_width))
        if refine_rounds:
            _report(progress, "refine", refine_rounds, refine_rounds)
        return rq

    def refine(self, x, codes, ridge=1.0):
        """Least-squares refit of all codebooks with ``codes`` fixed; returns a new quantizer.

        Solves ``min_C ||X - B C||^2 + ridge * ||C - C_old||^2`` where B is the one-hot
        matrix of the codes; the ridge term keeps unused codewords where they were.
        """
        x = as_matrix(x, name="training vectors", dim=self.dim)
        S, K, d = self.codebooks.shape
        codes = _check_codes(codes, S, K)
        btb, btx = _kernels().normal_equations(codes, x, K)
        btb[np.diag_indices_from(btb)] += ridge
        btx += ridge * self.codebooks.reshape(S * K, d)
        new = np.linalg.solve(btb, btx).astype(np.float32)
        return type(self)(round_bf16(new.reshape(S, K, d)))

    # -- encoding ---------------------------------------------------------------------------

    def _cross_tables(self):
        """cross[s] = (s, K, K) inner products of earlier stages' codewords with stage s's."""
        if "cross" not in self._cache:
            C = self.codebooks
            S, K, d = C.shape
            self._cache["cross"] = [
                np.ascontiguousarray((C[:s].reshape(-1, d) @ C[s].T).reshape(s, K, K))
                for s in range(S)]
            self._cache["cnorm"] = np.einsum("skd,skd->sk", C, C).astype(np.float32)
        return self._cache["cross"], self._cache["cnorm"]

    def _beam_stage(self, x, s, beam_width, state):
        """Advance a beam (dist (n, B), codes (n, B, S)) by stage ``s``; stage 0 starts it."""
        cross, cnorm = self._cross_tables()
        if state is None:
            dist = np.einsum("ij,ij->i", x, x)[:, None].astype(np.float32)
            codes = np.zeros((x.shape[0], 1, self.stages), dtype=np.uint8)
        else:
            dist, codes = state
            if codes.shape[2] < self.stages:  # training grows the code width stage by stage
                codes = np.concatenate(
                    [codes, np.zeros(codes.shape[:2] + (self.stages - codes.shape[2],), np.uint8)],
                    axis=2)
        xc = x @ self.codebooks[s].T
        b_out = min(beam_width, dist.shape[1] * self.codebook_size)
        return _kernels().beam_step(xc, dist, codes, cross[s], cnorm[s], s, b_out)

    def _greedy(self, x):
        """Greedy codes: nearest codeword of each stage to the explicit residual (BLAS-bound)."""
        _, cnorm = self._cross_tables()
        residual = x.copy()
        codes = np.empty((len(x), self.stages), dtype=np.uint8)
        for s in range(self.stages):
            scores = residual @ self.codebooks[s].T
            scores *= -2.0
            scores += cnorm[s]
            lab = np.argmin(scores, axis=1)
            codes[:, s] = lab
            residual -= self.codebooks[s][lab]
        return codes

    def encode(self, x, *, beam_width=1, batch=8192, progress=None):
        """Codes of the rows of ``x``: greedy (beam_width=1) or beam search.

        Returns
        -------
        codes : uint8 (n, S)
        """
        x = as_matrix(x, dim=self.dim)
        if beam_width < 1:
            raise InvalidInputError(f"beam_width must be >= 1, got {beam_width}")
        n = x.shape[0]
        out = np.empty((n, self.stages), dtype=np.uint8)
        for start in range(0, n, batch):
            _report(progress, "encode", start, n)
            xb = x[start:start + batch]
            if beam_width == 1:
                out[start:start + batch] = self._greedy(xb)
                continue
            state = None
            for s in range(self.stages):
                state = self._beam_stage(xb, s, beam_width, state)
            out[start:start + batch] = state[1][:, 0, :]
        _report(progress, "encode", n, n)
        return out

    # -- decoding and tables ----------------------------------------------------------------

    def decode(self, codes, stages=None):
        """Sum of the chosen codewords of the first ``stages`` stages: float32 (n, d)."""
        codes = _check_codes(codes, self.stages, self.codebook_size)
        upto = self.stages if stages is None else stages
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float32)
        for s in range(upto):
            out += self.codebooks[s][codes[:, s]]
        return out

    def norms(self, codes):
        """Squared norms ``||x^||^2`` of the decoded vectors, cross terms included: float32 (n,)."""
        xh = self.decode(codes)
        return np.einsum("ij,ij->i", xh, xh).astype(np.float32)

    def prefix_norms(self, codes, stages, batch=1 << 20):
        """Squared norms ``||x^_s||^2`` of the first ``stages`` stages' reconstruction:
        float32 (n,), from the codewords' pairwise inner products (one K x K table per pair
        of stages, no vector decoded: ~0.2 s per million rows at 8 stages)."""
        S, K = self.stages, self.codebook_size
        if not 1 <= stages <= S or codes.ndim != 2 or codes.shape[1] < stages:
            raise ValueError(f"stages must be in [1, {S}] within the codes, got {stages}")
        books = self.codebooks.astype(np.float64)
        out = np.empty(len(codes), np.float32)
        grams = {(a, b): books[a] @ books[b].T for a in range(stages) for b in range(a, stages)}
        for start in range(0, len(codes), batch):
            c = codes[start:start + batch, :stages].astype(np.intp)
            acc = np.zeros(len(c), np.float64)
            for (a, b), g in grams.items():
                acc += (1.0 if a == b else 2.0) * g[c[:, a], c[:, b]]
            out[start:start + batch] = acc
        return out

    def distortion_per_stage(self, x, codes):
        """Mean squared error of the reconstruction after each stage: float64 (S,)."""
        x = as_matrix(x, dim=self.dim)
        codes = _check_codes(codes, self.stages, self.codebook_size)
        residual = x.astype(np.float64)
        mse = np.empty(self.stages)
        for s in range(self.stages):
            residual -= self.codebooks[s][codes[:, s]]
            mse[s] = float(np.einsum("ij,ij->", residual, residual)) / x.shape[0]
        return mse

    def ip_table(self, queries):
        """Inner products of each query with every codeword: float32 (nq, S*K)."""
        if len(queries) == 1:
            kernels = _kernels()
            q = np.ascontiguousarray(queries[0], np.float32)
            if "bf16" not in self._cache:
                bits = self.codebooks.reshape(-1, self.dim).view(np.uint32)
                exact = not (bits & 0xFFFF).any()
                self._cache["bf16"] = (bits >> 16).astype(np.uint16) if exact else None
            if self._cache["bf16"] is not None:
                return kernels.matvec_bf16(self._cache["bf16"], q)[None]
            return kernels.matvec(self.codebooks.reshape(-1, self.dim), q)[None]
        flat = self._cache.get("flat")
        if flat is None:
            flat = self._cache["flat"] = np.ascontiguousarray(
                self.codebooks.reshape(-1, self.dim).T)
        return queries @ flat

    needs_norms = True

    def lut(self, queries, metric):
        """ADC tables: float32 (nq, S*K) and a per-query constant (nq,).

        The estimate for stored row i is ``const + bias[i] + sum_s lut[s*K + code[i, s]]``,
        with bias = ||x^||^2 for L2 and 0 otherwise; smaller is nearer for every metric.
        """
        check_metric(metric)
        ip = self.ip_table(queries)
        if metric == "l2":
            return ip * np.float32(-2.0), np.einsum("ij,ij->i", queries, queries)
        const = np.ones(len(queries), np.float32) if metric == "cosine" else \
            np.zeros(len(queries), np.float32)
        return -ip, const


@dataclass(frozen=True, eq=False)
class ProductQuantizer(ResidualQuantizer):
    """M sub-spaces of d/M dims, K codewords each, as an additive quantizer.

    The codebooks are stored full-width (M, K, d), zero outside each sub-space, so decode
    and norms are inherited; tables and encoding use the compact sub-space form.
    """

    @classmethod
    def train(cls, x, *, subspaces=16, codebook_size=256, n_iter=20, seed=0,
              max_points_per_centroid=256, progress=None):
        x = as_matrix(x, name="training vectors")
        n, d = x.shape
        if subspaces < 1 or d % subspaces:
            raise InvalidInputError(f"subspaces={subspaces} must divide dim={d}")
        if n < codebook_size:
            raise InvalidInputError(
                f"training needs at least codebook_size={codebook_size} vectors, got {n}")
        rng = np.random.default_rng(seed)
        ds = d // subspaces
        books = np.zeros((subspaces, codebook_size, d), dtype=np.float32)
        for m in range(subspaces):
            _report(progress, "train", m, subspaces)
            sl = slice(m * ds, (m + 1) * ds)
            books[m, :, sl] = kmeans(x[:, sl], codebook_size, n_iter=n_iter, seed=rng,
                                     max_points_per_centroid=max_points_per_centroid)
        _report(progress, "train", subspaces, subspaces)
        return cls(books)

    @property
    def _sub(self):
        sub = self._cache.get("sub")
        if sub is None:
            M, K, d = self.codebooks.shape
            ds = d // M
            sub = np.stack([self.codebooks[m, :, m * ds:(m + 1) * ds] for m in range(M)])
            self._cache["sub"] = sub
        return sub

    def encode(self, x, *, beam_width=1, batch=8192, progress=None):
        x = as_matrix(x, dim=self.dim)
        sub = self._sub
        M, K, ds = sub.shape
        out = np.empty((x.shape[0], M), dtype=np.uint8)
        for m in range(M):
            _report(progress, "encode", m, M)
            out[:, m] = assign(np.ascontiguousarray(x[:, m * ds:(m + 1) * ds]), sub[m])[0]
        _report(progress, "encode", M, M)
        return out

    def ip_table(self, queries):
        sub = self._sub
        M, K, ds = sub.shape
        q = queries.reshape(len(queries), M, ds)
        return np.einsum("qmd,mkd->qmk", q, sub).reshape(len(queries), M * K)

    needs_norms = False

    def lut(self, queries, metric):
        check_metric(metric)
        if metric != "l2":
            return super().lut(queries, metric)
        # sub-spaces are orthogonal, so ||x^||^2 is a sum of per-codeword terms: no stored norm
        cn = self._cache.get("cn")
        if cn is None:
            cn = self._cache["cn"] = np.einsum("mkd,mkd->mk", self._sub, self._sub).reshape(-1)
        return self.ip_table(queries) * np.float32(-2.0) + cn, \
            np.einsum("ij,ij->i", queries, queries)
