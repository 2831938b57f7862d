"""M4 data balancing (Alabdulmohsin et al., ICLR 2024, "CLIP the Bias"): per-example keep weights
that remove representation and association biases while staying close to a uniform keep rate.

Formulation
-----------
N samples; attributes (e.g. perceived gender) with groups k = 1..K and a target distribution π;
concepts r = 1..R. For sample i and one attribute: s_ik = 1 if its label is group k, h_i = 1 if it
has a label (so Σ_k s_ik = h_i), y_ir = 1 if it carries concept r. We choose keep weights
q ∈ [0, 1]^N minimising

    (1/N) Σ_i u_i (q_i − η)²                          (u_i > 0 a utility, 1 by default)

subject to mean_i q_i = η and, for every attribute, group k and concept r:

- "joint" (the paper's form): |mean_i q_i (s_ik − π_k h_i)| ≤ ε_R and
  |mean_i q_i y_ir (s_ik − π_k h_i)| ≤ ε_D;
- "conditional" (our default, ε in probability units like the audit metric):
  |P_q(k | person) − π_k| ≤ ε_R and |P_q(k | concept r, person) − π_k| ≤ ε_D, where P_q is the
  q-weighted share among labelled samples. Multiplying out the denominator gives the homogeneous
  pair ±Σ_i q_i y_ir (s_ik − π_k h_i) − ε Σ_i q_i y_ir h_i ≤ 0 (y ≡ 1 for representation).

Both are written as rows (1/N) Σ_i q_i a_ij ≤ b_j. Concepts with no labelled sample give no rows.

Algorithm
---------
Lagrangian dual with multipliers λ ≥ 0 (rows) and μ (mean): for fixed (λ, μ) each q_i minimises
u_i (q_i − η)² + q_i z_i with z_i = λ·a_i + μ, so q_i = clip(η − z_i / (2 u_i), 0, 1). The dual is
concave and smooth; its gradient is the constraint residual of q(λ, μ) and its Hessian is bounded
by (1/N) Σ_i ã_i ã_iᵀ / (2 u_i) with ã_i = (a_i, 1). We maximise it by accelerated projected
gradient ascent (FISTA with O'Donoghue-Candès adaptive restart), step 1/L with L the largest
eigenvalue of that small (m+1)×(m+1) bound, after a Jacobi rescaling of the rows (each row divided
by the square root of its diagonal entry: the same constraints, better conditioned dual, so rare
concepts converge as fast as frequent ones).

Efficiency: a_i depends only on the sample's class (its label per attribute and its set of
constrained concepts). Samples are compressed to classes exactly (mixed-radix integer keys of the
label and sorted concept columns, re-ranked with np.unique whenever the radix product could
overflow, per concept-count bucket; no hashing). A class touches one "cell" (attribute, scope,
group) per attribute and scope (scope = the representation row set or one concept), so
z = E (R λ̃) and the weighted cell totals P = Eᵀ Q / N are sparse products with ~(1 + concepts)
non-zeros per class, and the gradient is Rᵀ P − b with R a tiny cells × rows matrix. With a uniform
utility q is constant within a class and an iteration costs O(classes). With per-sample utilities
each class total Q_c(z) = Σ_{i∈c} clip(η − z v_i, 0, 1), v_i = 1/(2u_i), is piecewise linear in z:
samples are sorted by (class, v) once, and Q_c is read from prefix sums after one binary search
per class, so an iteration costs O(classes · log N) instead of O(N).

Tolerance: rows are solved tightened by a margin min(tol, ε/2) (in the bound's units) and the
ascent stops at the first iterate whose weights meet the true constraints (violation ≤ 0, checked
on the per-sample weights), have |mean − η| ≤ tol, and whose complementary-slackness gap
Σ λ_j (b_j − tightened row_j) is at most 1e-3 of the objective. Hence status "optimal" means the
returned weights meet ε exactly (ε = 0, or a feasible set thinner than tol/50, only to within tol).

Feasibility does not depend on u: the rows only see class totals Q_c ∈ [0, n_c] with Σ Q_c = ηN.
The ascent runs first; weights that meet the rows certify feasibility, so a typical solve needs no
LP. If it has not converged after `_PROBE_ITERATIONS`, an LP on the class fractions Q_c / n_c
(HiGHS interior point) decides whether the tightened rows are feasible (then the ascent resumes).
If not, we find the smallest t such that ε_R + t and ε_D + t are feasible. Joint: one LP
minimising t. Conditional: the rows are bilinear in t and Q, so we solve LPs s(t) = min_Q max_j
row_j (probability units) at trial t; since each row falls with t at a rate ≤ 1, t + s(t) bounds
t* below (a Newton step), and each LP's Q bounds it above by its own worst row; bisection takes
over when that stalls. t ≤ 0 means feasible with room −t: the margin shrinks to fit. Otherwise we
solve M4 at ε + t + tol (margin tol/2) and return status "infeasible" with the enforced ε.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.optimize import linprog
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

__all__ = [
    "AttributeInput",
    "Bound",
    "M4Options",
    "M4Result",
    "constraint_values",
    "solve_m4",
]

Bound = Literal["conditional", "joint"]
_BOUNDS = ("conditional", "joint")
_GAP_RTOL = 1e-3  # complementary-slackness gap allowed, relative to the objective
_LP_ZERO = 1e-9  # an LP's worst row at or below this counts as met
_PROBE_ITERATIONS = 1000  # dual ascent tried before any LP
_GUARD = 1e-12  # in-loop violations must be this far below the bound (round-off of the sums)


@dataclass(frozen=True)
class AttributeInput:
    """One sensitive attribute: a label per sample (-1 = none), its target shares and names."""

    name: str
    labels: np.ndarray
    target: np.ndarray
    groups: tuple[str, ...]


@dataclass(frozen=True)
class M4Options:
    """Keep rate η, bounds ε_R / ε_D, their reading, and the solver's tolerance and budget
    (max_iter: dual iterations per ascent; a solve that turns out thin or infeasible restarts
    once at the adjusted ε with a fresh budget)."""

    eta: float = 0.9
    eps_r: float = 0.01
    eps_d: float = 0.05
    bound: Bound = "conditional"
    tol: float = 1e-4
    max_iter: int = 20000


@dataclass
class M4Result:
    """Keep weights and how they were found; violations are in the bound's units, ≤ 0 = met."""

    weights: np.ndarray
    status: str
    iterations: int
    mean: float
    eps_r: float
    eps_d: float
    max_violation_r: float
    max_violation_d: float
    classes: int
    seconds: float
    message: str


# --------------------------------------------------------------------------------------------
# Validation and concept pairs
# --------------------------------------------------------------------------------------------


@dataclass
class _Attr:
    labels: np.ndarray  # int64 (N,)
    target: np.ndarray  # float64 (K,)

    @property
    def k(self) -> int:
        return len(self.target)


def _check_attributes(attributes: Sequence[AttributeInput], n: int) -> list[_Attr]:
    """Validated labels (int64) and targets (float64)."""
    out = []
    for attr in attributes:
        labels = np.asarray(attr.labels)
        target = np.asarray(attr.target, dtype=np.float64)
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"attribute {attr.name!r}: labels must have shape ({n},)")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"attribute {attr.name!r}: labels must be integers")
        if target.ndim != 1 or len(target) < 1:
            raise ValueError(f"attribute {attr.name!r}: target must be a non-empty 1-d array")
        if len(attr.groups) != len(target):
            raise ValueError(
                f"attribute {attr.name!r}: {len(attr.groups)} groups for {len(target)} shares"
            )
        if not np.all(np.isfinite(target)) or np.any(target <= 0):
            raise ValueError(f"attribute {attr.name!r}: target shares must be positive")
        if abs(target.sum() - 1.0) > 1e-6:
            raise ValueError(f"attribute {attr.name!r}: target sums to {target.sum():g}, not 1")
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < -1 or labels.max() >= len(target)):
            raise ValueError(f"attribute {attr.name!r}: labels must lie in -1..{len(target) - 1}")
        out.append(_Attr(labels, target / target.sum()))
    return out


def _check_concepts(
    concept_indptr: np.ndarray, concept_indices: np.ndarray, num_concepts: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """N, and the concept lists as int64 CSR arrays."""
    indptr = np.asarray(concept_indptr)
    indices = np.asarray(concept_indices)
    if num_concepts < 0:
        raise ValueError("num_concepts must be >= 0")
    if indptr.ndim != 1 or len(indptr) < 2:
        raise ValueError("concept_indptr must be 1-d with N + 1 >= 2 entries")
    if indices.ndim != 1:
        raise ValueError("concept_indices must be 1-d")
    for name, arr in (("concept_indptr", indptr), ("concept_indices", indices)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be integers")
    indptr = indptr.astype(np.int64)
    indices = indices.astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise ValueError("concept_indptr must start at 0, not decrease, and end at len(indices)")
    if indices.size and (indices.min() < 0 or indices.max() >= num_concepts):
        raise ValueError(f"concept_indices must lie in 0..{num_concepts - 1}")
    n = len(indptr) - 1
    if n * max(num_concepts, 1) >= 2**62:
        raise ValueError("too many samples times concepts for 64-bit keys")
    return n, indptr, indices


def _check_options(options: M4Options) -> None:
    if not 0.0 < options.eta <= 1.0:
        raise ValueError(f"eta must lie in (0, 1], got {options.eta}")
    for name in ("eps_r", "eps_d"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if options.bound not in _BOUNDS:
        raise ValueError(f"bound must be one of {_BOUNDS}, got {options.bound!r}")
    if not (math.isfinite(options.tol) and options.tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {options.tol}")
    if options.max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {options.max_iter}")


def _sample_concepts(
    n: int, indptr: np.ndarray, indices: np.ndarray, num_concepts: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sample, concept) pairs sorted by sample then concept, duplicates removed."""
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    radix = max(num_concepts, 1)
    key = rows * radix + indices
    step = np.diff(key)
    if not np.all(step > 0):  # lists not sorted or with repeats (np.sort beats np.unique here)
        key = np.sort(key)
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return key // radix, key % radix


# --------------------------------------------------------------------------------------------
# Exact class compression
# --------------------------------------------------------------------------------------------


@dataclass
class _Classes:
    ids: np.ndarray  # (N,) class of each sample
    counts: np.ndarray  # (C,) samples per class
    labels: list[np.ndarray]  # per attribute, (C,) label of the class
    pair_class: np.ndarray  # (class, concept) pairs of the classes' concept sets
    pair_concept: np.ndarray

    @property
    def size(self) -> int:
        return len(self.counts)


def _radix_ids(columns: Sequence[tuple[np.ndarray, int]], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact dense ids of the rows of `columns` ((values in [0, radix), radix) each, length m):
    a mixed-radix int64 key, re-ranked by np.unique before it could overflow. Returns the ids
    (ranked in lexicographic order of the rows) and the first row of each id."""
    key = np.zeros(m, dtype=np.int64)
    bound = 1
    for values, radix in columns:
        if bound * radix >= 2**62:
            _, key = np.unique(key, return_inverse=True)
            key = key.astype(np.int64)
            bound = int(key.max()) + 1 if m else 1
        key = key * radix + values
        bound *= radix
    _, first, ids = np.unique(key, return_index=True, return_inverse=True)
    return ids.astype(np.int64), first


def _compress(
    n: int, attrs: list[_Attr], rows: np.ndarray, cols: np.ndarray, num_concepts: int
) -> _Classes:
    """Samples → classes (labels per attribute, concept set), exactly. `rows`/`cols` must be the
    sorted, de-duplicated pairs of concepts that matter (see solve_m4)."""
    lengths = np.bincount(rows, minlength=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = np.empty(n, dtype=np.int64)
    reps: list[np.ndarray] = []
    offset = 0
    by_length = np.argsort(lengths, kind="stable")
    bucket_ends = np.cumsum(np.bincount(lengths[by_length]))
    bucket_start = 0
    for length, end in enumerate(bucket_ends):
        members = by_length[bucket_start:end]
        bucket_start = end
        if not len(members):
            continue
        columns: list[tuple[np.ndarray, int]] = [(a.labels[members] + 1, a.k + 1) for a in attrs]
        columns += [(cols[starts[members] + j], max(num_concepts, 1)) for j in range(length)]
        local, first = _radix_ids(columns, len(members))
        ids[members] = local + offset
        reps.append(members[first])
        offset += len(first)
    rep = np.concatenate(reps) if reps else np.zeros(0, dtype=np.int64)
    counts = np.bincount(ids, minlength=offset).astype(np.int64)
    rep_len = lengths[rep]
    pair_class = np.repeat(np.arange(offset, dtype=np.int64), rep_len)
    within = np.arange(len(pair_class), dtype=np.int64) - np.repeat(
        np.cumsum(rep_len) - rep_len, rep_len
    )
    pair_concept = cols[np.repeat(starts[rep], rep_len) + within]
    return _Classes(ids, counts, [a.labels[rep] for a in attrs], pair_class, pair_concept)


# --------------------------------------------------------------------------------------------
# Cells, rows and the sparse operators
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Cells (attribute, scope, group) + one constant cell; rows 2·cell + sign (0: +, 1: −)."""

    offsets: list[int]  # first cell of each attribute
    scopes: list[np.ndarray]  # per attribute: concept of each scope (-1 = representation)
    attrs: list[_Attr]
    ncells: int  # including the constant cell (last)

    @property
    def m(self) -> int:
        return 2 * (self.ncells - 1)


def _layout(attrs: list[_Attr], active: list[np.ndarray]) -> _Layout:
    offsets, scopes, cell = [], [], 0
    for attr, act in zip(attrs, active, strict=True):
        offsets.append(cell)
        scope = np.concatenate([[-1], np.flatnonzero(act)]).astype(np.int64)
        scopes.append(scope)
        cell += len(scope) * attr.k
    return _Layout(offsets, scopes, attrs, cell + 1)


def _incidence(classes: _Classes, layout: _Layout, num_concepts: int) -> sparse.csr_matrix:
    """E (classes × cells): 1 where a class contributes to a cell (always the constant cell)."""
    c = classes.size
    pc = [np.arange(c, dtype=np.int64)]
    pe = [np.full(c, layout.ncells - 1, dtype=np.int64)]
    for a, attr in enumerate(layout.attrs):
        lab = classes.labels[a]
        off, k = layout.offsets[a], attr.k
        has = np.flatnonzero(lab >= 0)
        pc.append(has)
        pe.append(off + lab[has])
        scope_of = np.full(max(num_concepts, 1), -1, dtype=np.int64)
        scope_of[layout.scopes[a][1:]] = np.arange(1, len(layout.scopes[a]))
        plab = lab[classes.pair_class]
        psc = scope_of[classes.pair_concept] if len(plab) else plab
        keep = (plab >= 0) & (psc >= 0)
        pc.append(classes.pair_class[keep])
        pe.append(off + psc[keep] * k + plab[keep])
    rows, cols = np.concatenate(pc), np.concatenate(pe)
    data = np.ones(len(rows))
    return sparse.csr_matrix((data, (rows, cols)), shape=(c, layout.ncells))


def _row_parts(layout: _Layout) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray]:
    """R_v, R_h (cells × m): a class in cell (a, s, k) has a_j = ±(δ_kk' − π_k') on row
    (a, s, k', ±) and h = 1 on all rows of scope (a, s). Also the scope kind of each row
    (0 = representation, 1 = association)."""
    rv_r, rv_c, rv_d, rh_r, rh_c = [], [], [], [], []
    kind = np.zeros(layout.m, dtype=np.int64)
    for a, attr in enumerate(layout.attrs):
        k, off, ns = attr.k, layout.offsets[a], len(layout.scopes[a])
        s, kk, k2 = np.meshgrid(np.arange(ns), np.arange(k), np.arange(k), indexing="ij")
        cell = (off + s * k + kk).ravel()
        row = 2 * (off + s * k + k2).ravel()
        val = ((kk == k2).astype(np.float64) - attr.target[k2]).ravel()
        rv_r += [cell, cell]
        rv_c += [row, row + 1]
        rv_d += [val, -val]
        rh_r += [cell, cell]
        rh_c += [row, row + 1]
        kind[2 * off + 2 * k : 2 * (off + ns * k)] = 1
    shape = (layout.ncells, layout.m)
    if rv_r:
        rv = sparse.csr_matrix(
            (np.concatenate(rv_d), (np.concatenate(rv_r), np.concatenate(rv_c))), shape=shape
        )
        rh_rows, rh_cols = np.concatenate(rh_r), np.concatenate(rh_c)
        rh = sparse.csr_matrix((np.ones(len(rh_rows)), (rh_rows, rh_cols)), shape=shape)
    else:
        rv = rh = sparse.csr_matrix(shape)
    return rv, rh, kind


def _dual_rows(
    rv: sparse.csr_matrix,
    rh: sparse.csr_matrix,
    kind: np.ndarray,
    ncells: int,
    bound: Bound,
    eps: tuple[float, float],
    eta: float,
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """R (cells × (m+1), last column the mean) and b for rows at levels eps = (ε_R, ε_D)."""
    level = np.where(kind == 0, eps[0], eps[1])
    if bound == "conditional":
        r = rv - rh @ sparse.diags(level)
        b = np.zeros(len(kind))
    else:
        r, b = rv, level
    const = sparse.csr_matrix(([1.0], ([ncells - 1], [0])), shape=(ncells, 1))
    return sparse.hstack([r, const], format="csr"), np.concatenate([b, [eta]])


# --------------------------------------------------------------------------------------------
# Class totals Q_c(z)
# --------------------------------------------------------------------------------------------


class _UniformKeep:
    """Constant utility u: q is constant within a class, Q_c = n_c clip(η − z_c v, 0, 1)."""

    def __init__(self, classes: _Classes, u: float, eta: float) -> None:
        self.n = classes.counts.astype(np.float64)
        self.ids = classes.ids
        self.v = 0.5 / u
        self.u = u
        self.eta = eta
        self.curvature = self.n * self.v  # Σ_{i∈c} 1 / (2 u_i)

    def totals(self, z: np.ndarray) -> np.ndarray:
        return self.n * np.clip(self.eta - z * self.v, 0.0, 1.0)

    def weights(self, z: np.ndarray) -> np.ndarray:
        return np.clip(self.eta - z * self.v, 0.0, 1.0)[self.ids]

    def objective(self, z: np.ndarray) -> float:
        q = np.clip(self.eta - z * self.v, 0.0, 1.0)
        return float(self.u * np.dot(self.n, (q - self.eta) ** 2) / self.n.sum())


class _UtilityKeep:
    """Per-sample utilities: Q_c(z) = Σ_{i∈c} clip(η − z v_i, 0, 1), v_i = 1/(2u_i), read from
    prefix sums of v sorted within each class after one binary search per class."""

    def __init__(self, classes: _Classes, utility: np.ndarray, eta: float) -> None:
        self.ids = classes.ids
        self.u = utility
        self.v = 0.5 / utility
        self.eta = eta
        self.n = classes.counts.astype(np.float64)
        order = np.lexsort((self.v, self.ids))
        vs = self.v[order]
        # Monotone float key: class + F(v), F(t) = t / (2 (1 + t)) ∈ [0, 0.5), so classes never
        # interleave; ties from rounding only move terms that are ~0 at the threshold.
        self.key = self.ids[order] + 0.5 * vs / (1.0 + vs)
        self.csum = np.concatenate([[0.0], np.cumsum(vs)])
        self.start = np.concatenate([[0], np.cumsum(classes.counts)[:-1]]).astype(np.int64)
        self.base = np.arange(classes.size, dtype=np.float64)
        self.curvature = np.bincount(self.ids, weights=self.v, minlength=classes.size)

    def totals(self, z: np.ndarray) -> np.ndarray:
        eta = self.eta
        pos = z >= 0
        w = np.abs(z)
        # z ≥ 0: terms η − z v_i > 0 for v_i < η / z; z < 0: η + w v_i < 1 for v_i < (1 − η) / w.
        frac = np.empty_like(z)
        frac[pos] = 0.5 * eta / (eta + w[pos])
        neg = ~pos
        frac[neg] = 0.5 * (1.0 - eta) / (1.0 - eta + w[neg])
        end = np.searchsorted(self.key, self.base + frac, side="left")
        cnt = end - self.start
        s = self.csum[end] - self.csum[self.start]
        q = np.where(pos, eta * cnt - w * s, eta * cnt + w * s + (self.n - cnt))
        return np.clip(q, 0.0, self.n)

    def weights(self, z: np.ndarray) -> np.ndarray:
        return np.clip(self.eta - z[self.ids] * self.v, 0.0, 1.0)

    def objective(self, z: np.ndarray) -> float:
        q = self.weights(z)
        return float(np.dot(self.u, (q - self.eta) ** 2) / len(q))


# --------------------------------------------------------------------------------------------
# Feasibility LPs on class fractions x_c = Q_c / n_c ∈ [0, 1]
# --------------------------------------------------------------------------------------------


class _Feasibility:
    """LPs over class fractions: rows V x (signed statistic) and H x (scope mass), both / N."""

    def __init__(
        self,
        e: sparse.csr_matrix,
        rv: sparse.csr_matrix,
        rh: sparse.csr_matrix,
        kind: np.ndarray,
        counts: np.ndarray,
        bound: Bound,
        eta: float,
    ) -> None:
        n = float(counts.sum())
        scale = sparse.diags(counts / n)
        v = (scale @ (e @ rv)).T.tocsr()  # m × C
        h = (scale @ (e @ rh)).T.tocsr()
        mass = np.asarray(h.sum(axis=1)).ravel()
        used = np.flatnonzero(mass > 0)  # rows of an attribute nobody is labelled for hold
        self.v, self.h, self.mass, self.kind = v[used], h[used], mass[used], kind[used]
        self.bound = bound
        self.a_eq = (counts / n)[None, :]
        self.eta = eta
        self.lps = 0

    def _level(self, eps: tuple[float, float]) -> np.ndarray:
        return np.where(self.kind == 0, eps[0], eps[1])

    def _rows(self, level: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
        if self.bound == "conditional":  # scaled to probability units by the scope mass
            rows = sparse.diags(1.0 / self.mass) @ (self.v - sparse.diags(level) @ self.h)
            return rows.tocsr(), np.zeros(len(level))
        return self.v, level

    def feasible(self, eps: tuple[float, float]) -> tuple[bool, np.ndarray | None]:
        """Whether some class fractions meet the rows at eps, and one such point."""
        if not len(self.kind):
            return True, None
        a_ub, b_ub = self._rows(self._level(eps))
        res = linprog(
            np.zeros(a_ub.shape[1]),
            A_ub=a_ub,
            b_ub=b_ub,
            A_eq=self.a_eq,
            b_eq=[self.eta],
            bounds=(0.0, 1.0),
            method="highs-ipm",
        )
        self.lps += 1
        if res.status == 2:
            return False, None
        return True, (res.x if res.status == 0 else None)

    def achieved(self, x: np.ndarray, eps: tuple[float, float]) -> float:
        """Smallest t with x feasible at eps + t (conditional units)."""
        num, den = self.v @ x, self.h @ x
        ok = den > 0
        if not ok.any():
            return 0.0
        return float(np.max(num[ok] / den[ok] - self._level(eps)[ok]))

    def min_violation(self, eps: tuple[float, float]) -> tuple[float | None, np.ndarray | None]:
        """min over x of the largest row at eps (conditional rows, probability units)."""
        a_ub, _ = self._rows(self._level(eps))
        m, c = a_ub.shape
        res = linprog(
            np.concatenate([np.zeros(c), [1.0]]),
            A_ub=sparse.hstack([a_ub, -np.ones((m, 1))], format="csr"),
            b_ub=np.zeros(m),
            A_eq=np.concatenate([self.a_eq, [[0.0]]], axis=1),
            b_eq=[self.eta],
            bounds=[(0.0, 1.0)] * c + [(None, None)],
            method="highs-ipm",
        )
        self.lps += 1
        if res.status != 0:
            return None, None
        return float(res.x[-1]), res.x[:-1]

    def min_slack(self, eps: tuple[float, float], tol: float) -> float | None:
        """Smallest t with the rows at eps + t feasible (to tol / 8 for conditional); t ≤ 0 means
        feasible at eps with at least −t to spare in every row. None if an LP fails."""
        if not len(self.kind):
            return 0.0
        if self.bound == "joint":
            m, c = self.v.shape
            res = linprog(
                np.concatenate([np.zeros(c), [1.0]]),
                A_ub=sparse.hstack([self.v, -np.ones((m, 1))], format="csr"),
                b_ub=self._level(eps),
                A_eq=np.concatenate([self.a_eq, [[0.0]]], axis=1),
                b_eq=[self.eta],
                bounds=[(0.0, 1.0)] * c + [(None, None)],
                method="highs-ipm",
            )
            self.lps += 1
            return float(res.x[-1]) if res.status == 0 else None
        # Conditional rows are bilinear in (t, x). With s(t) = min_x max_j row_j(t) (rows in
        # probability units), row_j falls with t at rate H_j x / S_j ≤ 1, so
        # s(t') ≥ s(t) − (t' − t): t + s(t) bounds t* below (a Newton step). The LP's x is
        # feasible at achieved(x), which bounds t* above, as does keeping every class at η.
        lo, hi = 0.0, max(self.achieved(np.full(self.v.shape[1], self.eta), eps), 0.0)
        t = 0.0
        for _ in range(60):
            gap = hi - lo
            worst, x = self.min_violation((eps[0] + t, eps[1] + t))
            if worst is None:
                return None
            if x is not None:
                hi = min(hi, max(self.achieved(x, eps), lo))
            if t == 0.0 and worst <= _LP_ZERO:
                return min(worst, 0.0)  # rows at eps − m hold for m ≤ −worst (rates ≤ 1)
            if worst <= _LP_ZERO:
                hi = min(hi, t)
            else:
                lo = max(lo, t + worst)
            if hi - lo <= tol / 8:
                break
            # Newton from below while it halves the bracket, bisection otherwise.
            t = lo if hi - lo < gap / 2 else 0.5 * (lo + hi)
        return hi


# --------------------------------------------------------------------------------------------
# Dual ascent
# --------------------------------------------------------------------------------------------


def _lipschitz(
    e: sparse.csr_matrix, r: sparse.csr_matrix, curvature: np.ndarray, n: int
) -> tuple[np.ndarray, float]:
    """Jacobi row scales c and λ_max of the scaled dual Hessian bound (1/N) R̃ᵀ Eᵀ W E R̃."""
    x = (e.T @ sparse.diags(curvature) @ e).tocsr()
    hess = (r.T @ x @ r).tocsr() / n
    diag = hess.diagonal()
    scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    scaled = sparse.diags(scale) @ hess @ sparse.diags(scale)
    # LAPACK's dense symmetric solvers crawl on these nearly rank-deficient matrices (± row
    # pairs), so Lanczos with a fixed start vector (deterministic); Gershgorin as a fallback.
    gershgorin = float(np.max(np.asarray(abs(scaled).sum(axis=1)).ravel()))
    if scaled.shape[0] < 3:
        top = float(np.linalg.eigvalsh(scaled.toarray())[-1])
    else:
        try:
            top = eigsh(
                scaled,
                k=1,
                which="LA",
                tol=1e-8,
                v0=np.ones(scaled.shape[0]),
                return_eigenvectors=False,
            )[0]
            top = min(float(top) * 1.001, gershgorin)
        except ArpackNoConvergence:
            top = gershgorin
    return scale, max(top, 1e-12)


@dataclass
class _Ascent:
    y: np.ndarray  # unscaled multipliers (λ, μ) to warm-start from
    z: np.ndarray  # class scores at the stopping point
    iterations: int
    converged: bool


def _ascend(
    e: sparse.csr_matrix,
    r: sparse.csr_matrix,
    b: np.ndarray,
    keep: _UniformKeep | _UtilityKeep,
    max_iter: int,
    y0: np.ndarray | None,
    candidate: Callable[[np.ndarray], bool],
    verify: Callable[[np.ndarray], bool],
) -> _Ascent:
    """FISTA with adaptive restart on the (Jacobi-scaled) dual, from y0 (or 0); stops when
    `candidate(P)` (cheap, on cell totals), the slackness gap and `verify(z)` (exact, on the
    per-sample weights) all hold."""
    n = float(keep.n.sum())
    scale, lip = _lipschitz(e, r, keep.curvature, n)
    rs = (r @ sparse.diags(scale)).tocsr()
    rst = rs.T.tocsr()
    bs = b * scale
    et = e.T.tocsr()
    m = len(b) - 1
    step = 1.0 / lip
    y = np.zeros(m + 1) if y0 is None else y0 / scale
    x = y.copy()
    t = 1.0
    z = np.zeros(e.shape[0])
    for it in range(1, max_iter + 1):
        z = e @ (rs @ x)
        p = (et @ keep.totals(z)) / n
        grad = rst @ p - bs
        if candidate(p) and _gap_ok(x, grad, m, keep, z) and verify(z):
            return _Ascent(x * scale, z, it, True)
        y_new = x + step * grad
        np.maximum(y_new[:m], 0.0, out=y_new[:m])
        if np.dot(y_new - x, y_new - y) < 0:  # adaptive restart: momentum points downhill
            t = 1.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        x = y_new + ((t - 1.0) / t_new) * (y_new - y)
        y, t = y_new, t_new
    return _Ascent(y * scale, z, max_iter, False)


def _gap_ok(
    x: np.ndarray, grad: np.ndarray, m: int, keep: _UniformKeep | _UtilityKeep, z: np.ndarray
) -> bool:
    """Complementary slackness Σ λ_j (b_j − a_j·q) small relative to the objective."""
    gap = -float(np.dot(np.maximum(x[:m], 0.0), grad[:m]))
    if gap <= 0:
        return True
    return gap <= _GAP_RTOL * keep.objective(z) + 1e-15


class _Problem:
    """The compressed instance: classes, cells, row parts and the keep-total evaluator."""

    def __init__(
        self,
        attributes: Sequence[AttributeInput],
        indptr: np.ndarray,
        indices: np.ndarray,
        num_concepts: int,
        options: M4Options,
        utility: np.ndarray | None,
    ) -> None:
        n, indptr, indices = _check_concepts(indptr, indices, num_concepts)
        self.n = n
        self.attrs = _check_attributes(attributes, n)
        self.num_concepts = num_concepts
        self.options = options
        # Concepts that matter: carried by a sample labelled for some attribute; a sample's
        # concepts matter only if it has a label.
        rows, cols = _sample_concepts(n, indptr, indices, num_concepts)
        self.rows, self.cols = rows, cols
        any_label = np.zeros(n, dtype=bool)
        any_active = np.zeros(num_concepts, dtype=bool)
        active = []
        for attr in self.attrs:
            labelled = attr.labels >= 0
            act = np.bincount(cols[labelled[rows]], minlength=num_concepts) > 0
            active.append(act)
            any_label |= labelled
            any_active |= act
        keep_pair = any_label[rows] & any_active[cols]
        self.classes = _compress(n, self.attrs, rows[keep_pair], cols[keep_pair], num_concepts)
        self.layout = _layout(self.attrs, active)
        self.e = _incidence(self.classes, self.layout, num_concepts)
        self.rv, self.rh, self.kind = _row_parts(self.layout)
        u_const = (
            1.0
            if utility is None
            else (float(utility[0]) if np.all(utility == utility[0]) else None)
        )
        self.keep: _UniformKeep | _UtilityKeep
        if u_const is not None:
            self.keep = _UniformKeep(self.classes, u_const, options.eta)
        else:
            assert utility is not None
            self.keep = _UtilityKeep(self.classes, utility, options.eta)
        self.iterations = 0

    def values(self, weights: np.ndarray, eps: tuple[float, float]) -> dict[str, np.ndarray]:
        return _statistics(
            self.attrs,
            self.n,
            self.rows,
            self.cols,
            self.num_concepts,
            weights,
            self.options.bound,
            eps,
        )

    def ascend(
        self,
        enforced: tuple[float, float],
        margin: tuple[float, float],
        budget: int,
        y0: np.ndarray | None = None,
    ) -> _Ascent:
        """Dual ascent on the rows at enforced − margin; done when the rows at enforced hold
        (within tol where the margin is 0)."""
        opt = self.options
        eta, tol, bound, layout = opt.eta, opt.tol, opt.bound, self.layout
        levels = (enforced[0] - margin[0], enforced[1] - margin[1])
        r, b = _dual_rows(self.rv, self.rh, self.kind, layout.ncells, bound, levels, eta)
        check = tuple(
            enf + (0.0 if mg > 0 else tol) for enf, mg in zip(enforced, margin, strict=True)
        )

        def candidate(p: np.ndarray) -> bool:
            if abs(p[-1] - eta) > tol:
                return False
            for a, attr in enumerate(self.attrs):
                off, k, ns = layout.offsets[a], attr.k, len(layout.scopes[a])
                cells = p[off : off + ns * k].reshape(ns, k)
                mass = cells.sum(axis=1, keepdims=True)
                dev = np.abs(cells - attr.target * mass)
                level = np.full((ns, 1), check[1])
                level[0] = check[0]
                if bound == "conditional":
                    if np.any(dev - level * mass > -_GUARD * mass):
                        return False
                elif np.any(dev - level > -_GUARD):
                    return False
            return True

        def verify(z: np.ndarray) -> bool:
            q = self.keep.weights(z)
            vals = self.values(q, (check[0], check[1]))
            return (
                abs(float(q.mean()) - eta) <= tol
                and _max_violation(vals["representation_violation"], 0.0) <= 0
                and _max_violation(vals["association_violation"], 0.0) <= 0
            )

        run = _ascend(self.e, r, b, self.keep, budget, y0, candidate, verify)
        self.iterations += run.iterations
        return run


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def constraint_values(
    attributes: Sequence[AttributeInput],
    concept_indptr: np.ndarray,
    concept_indices: np.ndarray,
    num_concepts: int,
    weights: np.ndarray,
    bound: Bound,
    eps_r: float = 0.01,
    eps_d: float = 0.05,
) -> dict[str, np.ndarray]:
    """The signed statistics of every constraint for `weights`, in the bound's units.

    joint: mean_i q_i y_ir (s_ik − π_k h_i); conditional: P_q(k | r, person) − π_k. Returns
    "representation" (A, K_max), "association" (A, R, K_max) and the matching "..._violation"
    arrays |statistic| − ε (≤ 0 = met). NaN where there is no constraint: groups beyond an
    attribute's K, concepts without labelled samples, and (conditional) no weighted labelled mass.
    """
    n, indptr, indices = _check_concepts(concept_indptr, concept_indices, num_concepts)
    attrs = _check_attributes(attributes, n)
    if bound not in _BOUNDS:
        raise ValueError(f"bound must be one of {_BOUNDS}, got {bound!r}")
    q = np.asarray(weights, dtype=np.float64)
    if q.shape != (n,):
        raise ValueError(f"weights must have shape ({n},)")
    rows, cols = _sample_concepts(n, indptr, indices, num_concepts)
    return _statistics(attrs, n, rows, cols, num_concepts, q, bound, (eps_r, eps_d))


def _statistics(
    attrs: list[_Attr],
    n: int,
    rows: np.ndarray,
    cols: np.ndarray,
    num_concepts: int,
    q: np.ndarray,
    bound: Bound,
    eps: tuple[float, float],
) -> dict[str, np.ndarray]:
    """constraint_values on validated inputs and (sample, concept) pairs."""
    kmax = max((a.k for a in attrs), default=0)
    rep = np.full((len(attrs), kmax), np.nan)
    assoc = np.full((len(attrs), num_concepts, kmax), np.nan)
    for a, attr in enumerate(attrs):
        k, lab = attr.k, attr.labels
        has = lab >= 0
        tot = np.bincount(lab[has], weights=q[has], minlength=k)
        sel = has[rows]
        plab, pcon = lab[rows[sel]], cols[sel]
        cell = np.bincount(pcon * k + plab, weights=q[rows[sel]], minlength=num_concepts * k)
        cell = cell.reshape(num_concepts, k)
        present = np.bincount(pcon, minlength=num_concepts) > 0
        for out, counts, exists in (
            (rep[a, :k], tot[None, :], np.array([has.any()])),
            (assoc[a, :, :k], cell, present),
        ):
            mass = counts.sum(axis=1, keepdims=True)
            if bound == "joint":
                stat = (counts - attr.target * mass) / n
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    stat = np.where(mass > 0, counts / mass - attr.target, np.nan)
            stat[~exists] = np.nan
            out[...] = stat.reshape(out.shape)
    return {
        "representation": rep,
        "association": assoc,
        "representation_violation": np.abs(rep) - eps[0],
        "association_violation": np.abs(assoc) - eps[1],
    }


def _max_violation(values: np.ndarray, eps: float) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.max()) if finite.size else -eps


def solve_m4(
    attributes: Sequence[AttributeInput],
    concept_indptr: np.ndarray,
    concept_indices: np.ndarray,
    num_concepts: int,
    options: M4Options = M4Options(),
    utility: np.ndarray | None = None,
) -> M4Result:
    """M4 keep weights for the samples (concept lists as CSR arrays over `num_concepts`).

    The dual ascent runs first: weights that meet the constraints prove feasibility. Only if
    it has not converged after `_PROBE_ITERATIONS` does an LP decide feasibility (and, when
    infeasible, the closest achievable ε)."""
    started = time.perf_counter()
    _check_options(options)
    util: np.ndarray | None = None
    if utility is not None:
        util = np.asarray(utility, dtype=np.float64)
        n_expected = len(np.asarray(concept_indptr)) - 1
        if util.shape != (n_expected,):
            raise ValueError(f"utility must have shape ({n_expected},)")
        if not np.all(np.isfinite(util)) or np.any(util <= 0):
            raise ValueError("utility must be finite and > 0")
    prob = _Problem(attributes, concept_indptr, concept_indices, num_concepts, options, util)
    eta, tol = options.eta, options.tol
    asked = (options.eps_r, options.eps_d)
    margin = (min(tol, asked[0] / 2), min(tol, asked[1] / 2))
    enforced, infeasible, note, lps = asked, False, "", 0

    probe = min(options.max_iter, _PROBE_ITERATIONS)
    run = prob.ascend(enforced, margin, probe)
    if not run.converged:
        feas = _Feasibility(
            prob.e, prob.rv, prob.rh, prob.kind, prob.classes.counts, options.bound, eta
        )
        left = options.max_iter - run.iterations
        if feas.feasible((asked[0] - margin[0], asked[1] - margin[1]))[0]:
            if left > 0:
                run = prob.ascend(enforced, margin, left, run.y)
        elif (t := feas.min_slack(asked, tol)) is None:
            return _give_up(prob, started, feas.lps)
        elif t <= _LP_ZERO:  # feasible, but with less room than the margin: shrink it
            room = -t / 2 if -t / 2 >= tol / 100 else 0.0  # no room: met to within tol
            margin = (min(margin[0], room), min(margin[1], room))
            run = prob.ascend(enforced, margin, options.max_iter)
        else:
            infeasible = True
            enforced = (asked[0] + t + tol, asked[1] + t + tol)
            margin = (tol / 2, tol / 2)
            note = f"; infeasible at the asked ε, closest achievable is ε + {t + tol:.3g}"
            run = prob.ascend(enforced, margin, options.max_iter)
        lps = feas.lps

    weights = prob.keep.weights(run.z)
    vals = prob.values(weights, asked)
    viol_r = _max_violation(vals["representation_violation"], asked[0])
    viol_d = _max_violation(vals["association_violation"], asked[1])
    status = "infeasible" if infeasible else ("optimal" if run.converged else "max_iter")
    seconds = time.perf_counter() - started
    mean = float(weights.mean())
    done = "converged" if run.converged else "stopped at max_iter"
    message = (
        f"M4 {status}: mean keep {mean:.4f} over {prob.n:,} samples "
        f"({prob.classes.size:,} classes), {done} after {prob.iterations} iterations "
        f"({lps} LPs) in {seconds:.2f} s; ε_R {enforced[0]:.4g} ε_D {enforced[1]:.4g} "
        f"({options.bound}), max violation {viol_r:.3g} / {viol_d:.3g}{note}"
    )
    return M4Result(
        weights=weights,
        status=status,
        iterations=prob.iterations,
        mean=mean,
        eps_r=enforced[0],
        eps_d=enforced[1],
        max_violation_r=viol_r,
        max_violation_d=viol_d,
        classes=prob.classes.size,
        seconds=seconds,
        message=message,
    )


def _give_up(prob: _Problem, started: float, lps: int) -> M4Result:
    """An LP failed (numerically), so the closest achievable ε is unknown: fall back to keeping
    every sample at η, which meets the ε of the untouched pool."""
    opt = prob.options
    asked = (opt.eps_r, opt.eps_d)
    weights = np.full(prob.n, opt.eta)
    vals = prob.values(weights, asked)
    viol_r = _max_violation(vals["representation_violation"], asked[0])
    viol_d = _max_violation(vals["association_violation"], asked[1])
    t = max(viol_r, viol_d, 0.0)
    return M4Result(
        weights=weights,
        status="infeasible",
        iterations=prob.iterations,
        mean=opt.eta,
        eps_r=asked[0] + t,
        eps_d=asked[1] + t,
        max_violation_r=viol_r,
        max_violation_d=viol_d,
        classes=prob.classes.size,
        seconds=time.perf_counter() - started,
        message=(
            f"M4 infeasible: an LP failed ({lps} LPs), so every sample is kept at η = {opt.eta}; "
            f"ε_R {asked[0] + t:.4g} ε_D {asked[1] + t:.4g} ({opt.bound})"
        ),
    )
