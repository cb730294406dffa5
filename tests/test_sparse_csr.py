"""The CSR kernel's form of the routed pairs (lmoe/kernels/csr.py): its two patterns against
matrices built by hand, its products against dense ones in float64, edge cases (tokens and experts
without pairs, no pairs at all)."""

import pytest
import torch

from lmoe.kernels.csr import CsrMixture, csr_ok, csr_pattern
from lmoe.kernels.grouped import GroupedMixture, route_pairs


def by_hand(
    g: torch.Tensor, values: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, r: int
) -> torch.Tensor:
    """V (tokens, E*r): pair p's r values at columns expert*r .. expert*r + r-1 of
    row token, one loop."""
    V = torch.zeros(g.shape[0], g.shape[1] * r, dtype=values.dtype)
    for p, (t, e) in enumerate(zip(token.tolist(), expert.tolist(), strict=True)):
        V[t, e * r : (e + 1) * r] = values[p]
    return V


ROUTINGS = {
    # dynamic-style: token 2 routes nowhere, expert 1 gets no token
    "dynamic": (
        torch.tensor(
            [
                [0.7, 0.0, 0.3, 0.0],
                [0.0, 0.0, 0.5, 0.5],
                [0.0, 0.0, 0.0, 0.0],
                [0.2, 0.0, 0.2, 0.6],
                [1.0, 0.0, 0.0, 0.0],
            ]
        ),
        None,
    ),
    "top2": (torch.softmax(torch.randn(9, 6, generator=torch.Generator().manual_seed(0)), -1), 2),
    "no pairs": (torch.zeros(3, 4), None),
}


def csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(rows.long(), cols.long(), values.reshape(-1), shape)


def transposed(pat, values: torch.Tensor) -> torch.Tensor:
    """V^T as the pattern's transpose() describes it: (row pointers, columns, the
    order of V's values)."""
    t_rows, t_cols, t_order = pat.transpose()
    return csr(t_rows, t_cols, values.reshape(-1)[t_order], pat.shape[::-1])


@pytest.mark.parametrize("name", ROUTINGS)
def test_patterns_are_the_routing_and_its_transpose(name):
    g, k = ROUTINGS[name]
    r = 3
    pat = csr_pattern(g, k, r)
    assert pat.token.tolist() == sorted(pat.token.tolist())  # token order
    if k is None:
        assert {(t, e) for t, e in zip(pat.token.tolist(), pat.expert.tolist(), strict=True)} == {
            tuple(c) for c in g.nonzero().tolist()
        }
    else:
        assert (torch.bincount(pat.token, minlength=g.shape[0]) == k).all()
        assert all(
            set(pat.expert[pat.token == t].tolist()) == set(g[t].topk(k).indices.tolist())
            for t in range(g.shape[0])
        )
    values = torch.randn(pat.token.shape[0], r, dtype=torch.float64)
    want = by_hand(g, values, pat.token, pat.expert, r)
    torch.testing.assert_close(
        csr(pat.rows, pat.cols, values, pat.shape).to_dense(), want, rtol=0, atol=0
    )
    torch.testing.assert_close(transposed(pat, values).to_dense(), want.t(), rtol=0, atol=0)
    t_rows = transposed(pat, values)
    for row in range(t_rows.shape[0]):  # each row's columns (tokens) ascending, as CSR wants
        cols = t_rows.col_indices()[
            t_rows.crow_indices()[row] : t_rows.crow_indices()[row + 1]
        ].tolist()
        assert cols == sorted(cols)


@pytest.mark.parametrize("name", ROUTINGS)
def test_products_equal_dense_ones(name):
    g, k = ROUTINGS[name]
    g, r = g.double(), 3
    pat = csr_pattern(g, k, r)
    values = torch.randn(pat.token.shape[0], r, dtype=torch.float64)
    V = by_hand(g, values, pat.token, pat.expert, r)
    a, b = (
        torch.randn(g.shape[0], 7, dtype=torch.float64),
        torch.randn(7, g.shape[1] * r, dtype=torch.float64),
    )
    full = a @ b
    cells = [
        full[t, e * r : (e + 1) * r]
        for t, e in zip(pat.token.tolist(), pat.expert.tolist(), strict=True)
    ]
    want = torch.stack(cells) if cells else full.new_zeros(0, r)
    torch.testing.assert_close(pat.sampled(a, b), want, rtol=1e-12, atol=1e-12)
    dense = torch.randn(
        g.shape[1] * r, 5, dtype=torch.float64
    )  # rows of a token or expert without pairs: 0
    torch.testing.assert_close(pat.times(values, dense), V @ dense, rtol=1e-12, atol=1e-12)
    dy = torch.randn(g.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(pat.transposed_times(values, dy), V.t() @ dy, rtol=1e-12, atol=1e-12)


def test_products_in_float32_are_the_dense_ones():
    """The embedding-bag sums in float32 (FBGEMM's kernel) against the float64 dense products."""
    g, k = ROUTINGS["top2"]
    pat = csr_pattern(g, k, 4)
    values = torch.randn(pat.token.shape[0], 4)
    V = by_hand(g, values.double(), pat.token, pat.expert, 4)
    dense, dy = torch.randn(V.shape[1], 40), torch.randn(V.shape[0], 40)
    torch.testing.assert_close(
        pat.times(values, dense).double(), V @ dense.double(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        pat.transposed_times(values, dy).double(), V.t() @ dy.double(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("params", [False, True])
@pytest.mark.parametrize("name", ["dynamic", "top2", "no pairs"])
def test_csr_mixture_gradcheck_and_grouped_agree(name, params):
    """float64: torch.autograd.gradcheck of every input, and the grouped-by-expert kernel's
    values and gradients."""
    g0, k = ROUTINGS[name]
    T, E = g0.shape
    r, d_in, d_out = 2, 5, 4
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(T, d_out, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(T, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(E, r, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    B = (
        torch.randn(E, r, d_out, dtype=torch.float64, generator=gen)
        .transpose(1, 2)
        .requires_grad_()
    )
    g = g0.double().requires_grad_()
    pat, pairs = csr_pattern(g0, k, r), route_pairs(g0, k)
    assert csr_ok(x.device, x.dtype)

    def csr(*args):
        return CsrMixture.apply(*args, pat, 1.5, params)

    # g's gradient is checked on the pattern's cells only: elsewhere the kernels
    # leave it at 0 (sparse.py)
    torch.autograd.gradcheck(lambda y, x, A, B: csr(y, x, A, B, g.detach()), (y, x, A, B))
    on = csr_pattern(g0, k, r)
    cells = (on.token, on.expert)
    torch.autograd.gradcheck(
        lambda w: csr(
            y.detach(), x.detach(), A.detach(), B.detach(), g.detach().index_put(cells, w)
        ),
        (g.detach()[cells].clone().requires_grad_(),),
    )
    out = csr(y, x, A, B, g)
    want = GroupedMixture.apply(y, x, A, B, g, pairs, 1.5, params)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (y, x, A, B, g), grad),
        torch.autograd.grad(want, (y, x, A, B, g), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_csr_is_for_cpu_floats_only():
    cpu = torch.device("cpu")
    assert csr_ok(cpu, torch.float32) and csr_ok(cpu, torch.float64)
    assert not csr_ok(cpu, torch.bfloat16) and not csr_ok(cpu, torch.float16)
    assert not csr_ok(torch.device("cuda"), torch.float32)  # a GPU: the grouped kernel


def test_the_routers_top_index_gives_the_same_pattern():
    """Top-k's Routing.top_index (its experts, in the router's order) spares the sparse
    path a second topk."""
    from lmoe.routing import topk_route, topk_route_indexed

    u = torch.randn(11, 8, generator=torch.Generator().manual_seed(3))
    g, index, weights = topk_route_indexed(u, 3)
    torch.testing.assert_close(g, topk_route(u, 3), rtol=0, atol=0)
    torch.testing.assert_close(
        weights, g.gather(1, index), rtol=0, atol=0
    )  # what the gathered path reads
    assert set(map(tuple, (g > 0).nonzero().tolist())) == {
        (t, e) for t in range(11) for e in index[t].tolist()
    }
    given, found = csr_pattern(g, 3, 2, index), csr_pattern(g, 3, 2)
    for name in ("token", "expert", "rows", "cols"):
        assert torch.equal(getattr(given, name), getattr(found, name)), name
    for a, b in zip(given.transpose(), found.transpose(), strict=True):
        assert torch.equal(a, b)
