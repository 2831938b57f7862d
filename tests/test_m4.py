"""M4 keep weights (`curate.fairness.m4`) against independent oracles: the full per-sample QP
solved by SLSQP, per-sample LPs for feasibility, and plain loops for the constraint statistics.
No oracle here uses the solver's class compression or dual code."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
from scipy.optimize import OptimizeResult, linprog, minimize

from curate.fairness import m4
from curate.fairness.m4 import AttributeInput, M4Options, constraint_values, solve_m4

# --------------------------------------------------------------------------------------------
# Instances and oracles
# --------------------------------------------------------------------------------------------


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


def make_pool(
    seed: int, n: int, ks: tuple[int, ...], concepts: int = 5, unlabelled: float = 0.3
) -> tuple[list[AttributeInput], np.ndarray, np.ndarray]:
    """Samples with 0-2 concepts; concept 0 leans to group 0 of every attribute; targets near
    (not at) the pool's shares, so representation and association rows both bind."""
    rng = np.random.default_rng(seed)
    sets = [sorted(rng.choice(concepts, size=rng.integers(0, 3), replace=False)) for _ in range(n)]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    indices = np.array([c for s in sets for c in s], dtype=np.int64)
    attrs = []
    for a, k in enumerate(ks):
        labels = rng.integers(0, k, size=n)
        for i, s in enumerate(sets):
            if 0 in s and rng.random() < 0.35:
                labels[i] = 0
        labels[rng.random(n) < unlabelled] = -1
        shares = np.bincount(labels[labels >= 0], minlength=k) / np.sum(labels >= 0)
        target = 0.9 * shares + 0.1 / k
        groups = tuple(f"g{a}{j}" for j in range(k))
        attrs.append(AttributeInput(f"attr{a}", labels, target / target.sum(), groups))
    return attrs, indptr, indices


def dense_rows(
    attrs: list[AttributeInput],
    indptr: np.ndarray,
    indices: np.ndarray,
    num_concepts: int,
    bound: str,
    eps_r: float,
    eps_d: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows G (m × N) and b of (1/N) G q ≤ b, built sample by sample with plain loops."""
    n = len(indptr) - 1
    rows, rhs = [], []
    for attr in attrs:
        k = len(attr.target)
        sets = [set(indices[indptr[i] : indptr[i + 1]].tolist()) for i in range(n)]
        scopes: list[tuple[int | None, float]] = [(None, eps_r)]
        for r in range(num_concepts):
            if any(r in sets[i] and attr.labels[i] >= 0 for i in range(n)):
                scopes.append((r, eps_d))
        for concept, eps in scopes:
            for group in range(k):
                for sign in (1.0, -1.0):
                    row = np.zeros(n)
                    for i in range(n):
                        y = 1.0 if concept is None or concept in sets[i] else 0.0
                        h = 1.0 if attr.labels[i] >= 0 else 0.0
                        s = 1.0 if attr.labels[i] == group else 0.0
                        row[i] = sign * y * (s - attr.target[group] * h)
                        if bound == "conditional":
                            row[i] -= eps * y * h
                    rows.append(row)
                    rhs.append(eps if bound == "joint" else 0.0)
    return np.array(rows), np.array(rhs)


def qp_oracle(
    g: np.ndarray, b: np.ndarray, eta: float, utility: np.ndarray
) -> tuple[np.ndarray, float]:
    """The per-sample QP by SLSQP: min mean u (q − η)² s.t. G q / N ≤ b, mean q = η, q ∈ [0, 1]
    (rows scaled to unit 1-norm, objective × N: SLSQP is slow and fragile when badly scaled)."""
    n = g.shape[1]
    scale = 1.0 / np.abs(g).sum(axis=1)
    gs, bs = g * scale[:, None], b * scale * n
    with one_blas_thread():  # small dense algebra: threads only fight a busy machine
        res = _slsqp(gs, bs, eta, utility)
    # SLSQP may end on "positive directional derivative" at the optimum: judge the point itself
    assert np.max(g @ res.x / n - b) <= 1e-10 and abs(res.x.mean() - eta) <= 1e-10, res.message
    return res.x, float(res.fun) / n


def _slsqp(gs: np.ndarray, bs: np.ndarray, eta: float, utility: np.ndarray) -> OptimizeResult:
    n = gs.shape[1]
    return minimize(
        lambda q: float(np.dot(utility, (q - eta) ** 2)),
        np.full(n, eta),
        jac=lambda q: 2 * utility * (q - eta),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[
            {"type": "ineq", "fun": lambda q: bs - gs @ q, "jac": lambda q: -gs},
            {
                "type": "eq",
                "fun": lambda q: np.array([q.sum() - eta * n]),
                "jac": lambda q: np.ones((1, n)),
            },
        ],
        options={"maxiter": 1000, "ftol": 1e-15},
    )


def lp_feasible(g: np.ndarray, b: np.ndarray, eta: float) -> bool:
    """Per-sample LP: is there q ∈ [0, 1]^N with mean η and G q / N ≤ b?"""
    n = g.shape[1]
    res = linprog(
        np.zeros(n),
        A_ub=g / n,
        b_ub=b,
        A_eq=np.full((1, n), 1.0 / n),
        b_eq=[eta],
        bounds=(0, 1),
        method="highs",
    )
    assert res.status in (0, 2), res.message
    return res.status == 0


def objective(q: np.ndarray, eta: float, utility: np.ndarray) -> float:
    return float(np.dot(utility, (q - eta) ** 2) / len(q))


def class_keys(attrs: list[AttributeInput], indptr: np.ndarray, indices: np.ndarray) -> list:
    n = len(indptr) - 1
    return [
        (tuple(int(a.labels[i]) for a in attrs), frozenset(indices[indptr[i] : indptr[i + 1]]))
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Against the QP oracle
# --------------------------------------------------------------------------------------------

CASES = [
    # seed, n, groups per attribute, bound, random utility
    (0, 240, (2,), "conditional", False),
    (1, 300, (2, 3), "conditional", True),
    (6, 300, (3,), "conditional", True),
    (2, 260, (2, 4), "conditional", False),
    (3, 220, (4,), "joint", False),
    (4, 280, (2, 3), "joint", True),
    (5, 300, (3,), "joint", True),
]


@pytest.mark.parametrize(("seed", "n", "ks", "bound", "random_utility"), CASES)
def test_matches_qp_oracle(
    seed: int, n: int, ks: tuple[int, ...], bound: str, random_utility: bool
) -> None:
    attrs, indptr, indices = make_pool(seed, n, ks)
    eta = 0.85
    eps_r, eps_d = (0.01, 0.04) if bound == "conditional" else (0.002, 0.01)
    utility = np.random.default_rng(seed + 100).uniform(0.3, 3.0, n) if random_utility else None
    u = np.ones(n) if utility is None else utility
    tol = 1e-6
    opts = M4Options(eta=eta, eps_r=eps_r, eps_d=eps_d, bound=bound, tol=tol)  # type: ignore[arg-type]
    res = solve_m4(attrs, indptr, indices, 5, opts, utility)

    g, b = dense_rows(attrs, indptr, indices, 5, bound, eps_r, eps_d)
    q_star, f_star = qp_oracle(g, b, eta, u)
    assert np.max(g @ q_star / n - b) > -1e-9, "instance should have a binding row"

    assert res.status == "optimal", res.message
    q = res.weights
    assert q.dtype == np.float64 and q.shape == (n,)
    assert np.all((q >= 0) & (q <= 1))
    assert abs(q.mean() - eta) <= tol
    assert res.mean == pytest.approx(q.mean())
    assert np.max(g @ q / n - b) <= 1e-12  # the rows hold with the ε asked
    assert res.max_violation_r <= 0 and res.max_violation_d <= 0
    assert (res.eps_r, res.eps_d) == (eps_r, eps_d)
    f = objective(q, eta, u)
    assert f == pytest.approx(f_star, rel=2e-3, abs=1e-9)
    assert np.max(np.abs(q - q_star)) < 2e-3  # strictly convex: the optimum is unique

    # weights are constant within a class exactly when the utility is
    spread = {}
    for key, w in zip(class_keys(attrs, indptr, indices), q, strict=True):
        spread.setdefault(key, []).append(w)
    varies = max(np.ptp(ws) for ws in spread.values())
    if random_utility:
        assert varies > 1e-3
    else:
        assert varies == 0.0


@pytest.mark.parametrize("bound", ["conditional", "joint"])
def test_lp_certified_then_warm_continued(bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A one-iteration probe: the LP certifies feasibility, the ascent resumes where it was.
    monkeypatch.setattr(m4, "_PROBE_ITERATIONS", 1)
    attrs, indptr, indices = make_pool(0, 240, (2,))
    eps = (0.01, 0.04) if bound == "conditional" else (0.002, 0.01)
    opts = M4Options(eta=0.85, eps_r=eps[0], eps_d=eps[1], bound=bound, tol=1e-6)  # type: ignore[arg-type]
    res = solve_m4(attrs, indptr, indices, 5, opts)
    assert res.status == "optimal" and "(1 LPs)" in res.message, res.message
    g, b = dense_rows(attrs, indptr, indices, 5, bound, *eps)
    _, f_star = qp_oracle(g, b, 0.85, np.ones(240))
    assert objective(res.weights, 0.85, np.ones(240)) == pytest.approx(f_star, rel=2e-3)
    assert np.max(g @ res.weights / 240 - b) <= 1e-12


def test_already_balanced_pool_keeps_everyone_equally() -> None:
    attrs, indptr, indices = make_pool(7, 200, (3,))
    res = solve_m4(attrs, indptr, indices, 5, M4Options(eta=0.7, eps_r=1.0, eps_d=1.0))
    assert res.status == "optimal"
    np.testing.assert_array_equal(res.weights, np.full(200, 0.7))


def test_no_labels_means_no_constraints() -> None:
    n = 50
    attr = AttributeInput("a", np.full(n, -1), np.array([0.5, 0.5]), ("x", "y"))
    indptr = np.arange(n + 1)
    res = solve_m4([attr], indptr, np.zeros(n, dtype=int), 3, M4Options(eps_r=0, eps_d=0))
    assert res.status == "optimal" and res.classes == 1
    np.testing.assert_array_equal(res.weights, np.full(n, 0.9))


def test_max_iter_status() -> None:
    attrs, indptr, indices = make_pool(0, 240, (2,))
    opts = M4Options(eta=0.85, eps_r=0.01, eps_d=0.04, max_iter=2)
    res = solve_m4(attrs, indptr, indices, 5, opts)
    assert res.status == "max_iter" and res.iterations == 2
    assert np.all((res.weights >= 0) & (res.weights <= 1))


# --------------------------------------------------------------------------------------------
# Infeasibility and the closest achievable ε
# --------------------------------------------------------------------------------------------


def one_sided_pool() -> tuple[list[AttributeInput], np.ndarray, np.ndarray]:
    """Concept 0's labelled samples are all group 0; concept 1 is balanced."""
    rng = np.random.default_rng(11)
    n = 160
    labels = rng.integers(0, 2, size=n)
    sets = [[0] if i < 30 else ([1] if i < 90 else []) for i in range(n)]
    labels[:30] = 0
    labels[rng.random(n) < 0.2] = -1
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    indices = np.array([c for s in sets for c in s], dtype=np.int64)
    attr = AttributeInput("a", labels, np.array([0.5, 0.5]), ("x", "y"))
    return [attr], indptr, indices


INFEASIBLE = [
    ("one_sided_concept_eta_1", "conditional", 1.0, 0.01, 0.05),
    ("one_sided_concept_eta_1", "joint", 1.0, 0.005, 0.01),
    ("eps_zero", "conditional", 0.6, 0.0, 0.0),
    ("eps_zero", "joint", 0.6, 0.0, 0.0),
]


@pytest.mark.parametrize(("case", "bound", "eta", "eps_r", "eps_d"), INFEASIBLE)
def test_infeasible_reports_closest_achievable(
    case: str, bound: str, eta: float, eps_r: float, eps_d: float
) -> None:
    if case == "one_sided_concept_eta_1":
        attrs, indptr, indices = one_sided_pool()
        concepts = 2
    else:  # group 0 is 80% of the pool; dropping 40% cannot reach 50/50 (with a concept too)
        n = 100
        labels = np.array([0] * 80 + [1] * 20)
        attrs = [AttributeInput("a", labels, np.array([0.5, 0.5]), ("x", "y"))]
        indptr = np.concatenate([[0], np.cumsum(np.arange(n) % 2)])
        indices = np.zeros(n // 2, dtype=np.int64)
        concepts = 1
    tol = 1e-3
    opts = M4Options(eta=eta, eps_r=eps_r, eps_d=eps_d, bound=bound, tol=tol)  # type: ignore[arg-type]
    res = solve_m4(attrs, indptr, indices, concepts, opts)
    assert res.status == "infeasible", res.message
    t = res.eps_d - eps_d
    assert res.eps_r - eps_r == pytest.approx(t) and t > 0
    assert max(res.max_violation_r, res.max_violation_d) > 0
    assert "infeasible" in res.message

    def feasible_at(extra: float) -> bool:
        g, b = dense_rows(attrs, indptr, indices, concepts, bound, eps_r + extra, eps_d + extra)
        return lp_feasible(g, b, eta)

    assert feasible_at(t)
    assert not feasible_at(t - 1.6 * tol)  # within tol (+ bisection step) of the smallest
    # the weights meet the enforced ε and keep the mean
    g, b = dense_rows(attrs, indptr, indices, concepts, bound, res.eps_r, res.eps_d)
    assert np.max(g @ res.weights / len(res.weights) - b) <= 1e-12
    assert abs(res.mean - eta) <= tol


@pytest.mark.parametrize("bound", ["conditional", "joint"])
def test_feasible_with_less_room_than_tol_is_optimal(
    bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Just above the closest achievable ε: feasible, but not once tightened by tol. The dual
    # probe is cut to one iteration so the LPs decide (it may otherwise luck into a feasible
    # iterate before it diverges).
    monkeypatch.setattr(m4, "_PROBE_ITERATIONS", 1)
    n = 100
    labels = np.array([0] * 80 + [1] * 20)
    attrs = [AttributeInput("a", labels, np.array([0.5, 0.5]), ("x", "y"))]
    indptr = np.concatenate([[0], np.cumsum(np.arange(n) % 2)])
    indices = np.zeros(n // 2, dtype=np.int64)
    tol = 1e-3
    opts = M4Options(eta=0.6, eps_r=0.0, eps_d=0.0, bound=bound, tol=tol)  # type: ignore[arg-type]
    closest = solve_m4(attrs, indptr, indices, 1, opts).eps_d - tol  # within tol / 8 of t*
    eps = closest + tol / 4
    g, b = dense_rows(attrs, indptr, indices, 1, bound, eps, eps)
    assert lp_feasible(g, b, 0.6)
    assert not lp_feasible(*dense_rows(attrs, indptr, indices, 1, bound, eps - tol, eps - tol), 0.6)
    opts = M4Options(eta=0.6, eps_r=eps, eps_d=eps, bound=bound, tol=tol)  # type: ignore[arg-type]
    res = solve_m4(attrs, indptr, indices, 1, opts)
    assert res.status == "optimal", res.message
    assert "(0 LPs)" not in res.message
    assert (res.eps_r, res.eps_d) == (eps, eps)
    assert res.max_violation_r <= 0 and res.max_violation_d <= 0
    assert np.max(g @ res.weights / n - b) <= 1e-12


def test_status_agrees_with_lp_oracle_on_feasibility() -> None:
    verdicts = set()
    for seed, bound in itertools.product(range(8, 16), ("conditional", "joint")):
        attrs, indptr, indices = make_pool(seed, 120, (2,))
        eps = (0.02, 0.05) if bound == "conditional" else (0.004, 0.01)
        eta = 0.9 + 0.01 * (seed % 4)  # feasibility flips around η ≈ 0.9-0.95 here
        g, b = dense_rows(attrs, indptr, indices, 5, bound, *eps)
        feasible = lp_feasible(g, b, eta)
        opts = M4Options(eta=eta, eps_r=eps[0], eps_d=eps[1], bound=bound, tol=1e-4)  # type: ignore[arg-type]
        res = solve_m4(attrs, indptr, indices, 5, opts)
        assert res.status == ("optimal" if feasible else "infeasible"), (seed, bound, res.message)
        verdicts.add(feasible)
    assert verdicts == {True, False}  # both kinds were exercised


# --------------------------------------------------------------------------------------------
# constraint_values, classes, determinism, validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["conditional", "joint"])
def test_constraint_values_match_loops(bound: str) -> None:
    attrs, indptr, indices = make_pool(21, 120, (2, 3), concepts=6)
    # concept 5: never on a labelled sample of attribute 0 (no constraint → NaN)
    n = len(indptr) - 1
    q = np.random.default_rng(3).uniform(0, 1, n)
    sets = [set(indices[indptr[i] : indptr[i + 1]].tolist()) for i in range(n)]
    labels0 = attrs[0].labels.copy()
    for i in range(n):
        if 5 in sets[i]:
            labels0[i] = -1
    attrs[0] = AttributeInput("attr0", labels0, attrs[0].target, attrs[0].groups)
    vals = constraint_values(attrs, indptr, indices, 6, q, bound, eps_r=0.02, eps_d=0.07)
    assert vals["representation"].shape == (2, 3)
    assert vals["association"].shape == (2, 6, 3)
    for a, attr in enumerate(attrs):
        k = len(attr.target)
        assert np.all(np.isnan(vals["representation"][a, k:]))
        for concept in [None, *range(6)]:
            members = [i for i in range(n) if concept is None or concept in sets[i]]
            labelled = [i for i in members if attr.labels[i] >= 0]
            got = (
                vals["representation"][a, :k]
                if concept is None
                else vals["association"][a, concept, :k]
            )
            if not labelled:
                assert np.all(np.isnan(got))
                continue
            mass = sum(q[i] for i in labelled)
            for group in range(k):
                share = sum(q[i] for i in labelled if attr.labels[i] == group)
                if bound == "joint":
                    want = (share - attr.target[group] * mass) / n
                else:
                    want = share / mass - attr.target[group]
                assert got[group] == pytest.approx(want, abs=1e-12)
            eps = 0.02 if concept is None else 0.07
            viol = (
                vals["representation_violation"][a, :k]
                if concept is None
                else vals["association_violation"][a, concept, :k]
            )
            np.testing.assert_allclose(viol, np.abs(got) - eps)
    assert np.all(np.isnan(vals["association"][0, 5]))


def test_classes_are_exact() -> None:
    # {1, 6}, {2, 5} and {3, 4} share their sum and their xor; {0, 7} shares the sum too.
    sets = [[1, 6], [2, 5], [3, 4], [0, 7], [6, 1, 6]] * 30
    n = len(sets)
    labels = np.array([i % 2 for i in range(n)])
    labels[:10] = -1
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    indices = np.array([c for s in sets for c in s])
    attr = AttributeInput("a", labels, np.array([0.5, 0.5]), ("x", "y"))
    res = solve_m4([attr], indptr, indices, 8, M4Options(eps_r=0.2, eps_d=0.2))
    # one class per distinct (label, concept set) among labelled samples, plus the unlabelled
    labelled = {(int(labels[i]), frozenset(sets[i])) for i in range(n) if labels[i] >= 0}
    assert res.classes == len(labelled) + 1

    # Many concepts per sample from a huge vocabulary: the radix key overflows and is re-ranked.
    rng = np.random.default_rng(5)
    big = 10**6
    base = [sorted(rng.choice(big, size=6, replace=False).tolist()) for _ in range(20)]
    sets = [base[int(j)] for j in rng.integers(0, 20, size=400)]
    sets += [[s[0] + 1, *s[1:]] if s[0] + 1 < s[1] else s for s in sets[:50]]
    n = len(sets)
    labels = rng.integers(0, 3, size=n)
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    indices = np.array([c for s in sets for c in s])
    attr = AttributeInput("a", labels, np.full(3, 1 / 3), ("x", "y", "z"))
    res = solve_m4([attr], indptr, indices, big, M4Options(eps_r=1.0, eps_d=1.0))
    assert res.classes == len({(int(labels[i]), tuple(sets[i])) for i in range(n)})


def test_classes_separate_colliding_sets_in_the_solution() -> None:
    # {1, 6} leans to group 0 and {2, 5} is balanced; a sum/xor hash would merge them.
    sets = [[1, 6]] * 40 + [[2, 5]] * 40
    labels = np.array([0] * 30 + [1] * 10 + [0, 1] * 20)
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    indices = np.array([c for s in sets for c in s])
    attr = AttributeInput("a", labels, np.array([0.5, 0.5]), ("x", "y"))
    res = solve_m4([attr], indptr, indices, 8, M4Options(eta=0.8, eps_r=0.3, eps_d=0.1))
    assert res.status == "optimal" and res.classes == 4
    q = res.weights
    assert q[0] < q[30]  # skewed concept: group 0 dropped more than group 1
    assert q[40] == pytest.approx(q[41], abs=0.05) and q[0] != q[40]


@pytest.mark.parametrize("random_utility", [False, True])
def test_deterministic(random_utility: bool) -> None:
    attrs, indptr, indices = make_pool(31, 400, (2, 3))
    utility = np.random.default_rng(0).uniform(0.5, 2, 400) if random_utility else None
    opts = M4Options(eta=0.85, eps_r=0.01, eps_d=0.04)
    first = solve_m4(attrs, indptr, indices, 5, opts, utility)
    second = solve_m4(attrs, indptr, indices, 5, opts, utility)
    assert first.weights.tobytes() == second.weights.tobytes()
    assert first.iterations == second.iterations


def _bad(**change: object) -> dict[str, object]:
    n = 4
    args: dict[str, object] = {
        "labels": np.array([0, 1, -1, 0]),
        "target": np.array([0.5, 0.5]),
        "groups": ("x", "y"),
        "indptr": np.array([0, 1, 1, 2, 2]),
        "indices": np.array([0, 1]),
        "num_concepts": 2,
        "options": M4Options(),
        "utility": np.ones(n),
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change",
    [
        {"options": M4Options(eta=0.0)},
        {"options": M4Options(eta=1.2)},
        {"options": M4Options(eps_r=-0.1)},
        {"options": M4Options(eps_d=float("nan"))},
        {"options": M4Options(bound="both")},  # type: ignore[arg-type]
        {"options": M4Options(tol=0.0)},
        {"options": M4Options(max_iter=0)},
        {"target": np.array([0.6, 0.6])},
        {"target": np.array([1.0, 0.0])},
        {"groups": ("x",)},
        {"labels": np.array([0, 2, -1, 0])},
        {"labels": np.array([0, 1, -2, 0])},
        {"labels": np.array([0, 1, 0])},
        {"labels": np.array([0.0, 1.0, 0.0, 0.0])},
        {"utility": np.array([1.0, 0.0, 1.0, 1.0])},
        {"utility": np.array([1.0, np.inf, 1.0, 1.0])},
        {"utility": np.ones(3)},
        {"indices": np.array([0, 2])},
        {"indptr": np.array([0, 1, 1, 2])},
        {"indptr": np.array([0, 2, 1, 2, 2])},
    ],
)
def test_validation(change: dict[str, object]) -> None:
    args = _bad(**change)
    attr = AttributeInput("a", args["labels"], args["target"], args["groups"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        solve_m4(
            [attr],
            args["indptr"],
            args["indices"],
            args["num_concepts"],  # type: ignore[arg-type]
            args["options"],
            args["utility"],  # type: ignore[arg-type]
        )
