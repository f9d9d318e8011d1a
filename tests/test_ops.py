"""The pure math: permutations and factor products against dense references, Cayley, vector bank."""
import pytest
import torch
from peft.tuners.boft.layer import BOFTLayer
from peft.tuners.oft.layer import OFTRotationModule

from boftvision.ops.orthogonal import (
    apply_factor,
    butterfly_apply,
    butterfly_perm,
    butterfly_span,
    cayley,
    cayley_neumann,
    check_butterfly_shape,
    collapse_butterfly,
    dense_rotation,
    max_butterfly_factors,
    multiplicative_dropout,
    orthogonality_error,
    rotate_weight,
    skew_from_square,
    skew_from_upper,
    upper_from_skew,
)
from boftvision.ops.vector_bank import admix, lora_factors, topk_compress, topk_expand

SHAPES = [(16, 2, 4), (64, 4, 3), (96, 8, 2), (48, 4, 3), (32, 8, 1), (24, 3, 1)]


def dense_reference(blocks: torch.Tensor) -> torch.Tensor:
    """R = B_{m−1} ⋯ B_0 with dense P_i D_i P_iᵀ, the way PEFT builds it."""
    m, n, b, _ = blocks.shape
    d = n * b
    r = torch.eye(d, dtype=blocks.dtype)
    for i in range(m):
        p = torch.zeros(d, d, dtype=blocks.dtype)
        p[torch.arange(d), butterfly_perm(d, b, i)] = 1
        r = p @ torch.block_diag(*blocks[i]) @ p.T @ r
    return r


@pytest.mark.parametrize("d,b,m", [s for s in SHAPES if s[1] % 2 == 0])
def test_permutation_matches_peft(d, b, m):
    for i in range(m):
        ref = BOFTLayer.block_butterfly_perm(None, d, d // b // 2**i, b // 2, m - 1)
        assert torch.equal(ref, butterfly_perm(d, b, i))


def test_permutation_documented_example():
    assert butterfly_perm(16, 2, 0).tolist() == list(range(16))
    assert butterfly_perm(16, 2, 1)[:8].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_perm(16, 2, 2)[:8].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("d,b,m", SHAPES)
def test_butterfly_apply_matches_dense_products(d, b, m):
    torch.manual_seed(d + b + m)
    blocks = torch.eye(b) + 0.3 * torch.randn(m, d // b, b, b, dtype=torch.float64)
    r = dense_reference(blocks)
    x = torch.randn(7, d, dtype=torch.float64)
    torch.testing.assert_close(butterfly_apply(x, blocks), x @ r)
    torch.testing.assert_close(butterfly_apply(x, blocks, transpose=True), x @ r.T)
    torch.testing.assert_close(butterfly_apply(x, blocks, inverse=True), x @ torch.linalg.inv(r))
    torch.testing.assert_close(butterfly_apply(x, blocks, transpose=True, inverse=True), x @ torch.linalg.inv(r).T)
    w = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(rotate_weight(w, blocks), w @ r.T)
    torch.testing.assert_close(rotate_weight(rotate_weight(w, blocks), blocks, inverse=True), w)


def test_single_factor_is_block_diagonal():
    blocks = torch.randn(6, 4, 4)
    x = torch.randn(3, 24)
    torch.testing.assert_close(apply_factor(x, blocks, 0), x @ torch.block_diag(*blocks))


def test_cayley_orthogonal_identity_and_peft_convention():
    torch.manual_seed(0)
    params = torch.randn(20, 8, 8)
    r = cayley(skew_from_square(params))
    assert orthogonality_error(r) <= 1e-5
    torch.testing.assert_close(cayley(torch.zeros(3, 8, 8)), torch.eye(8).expand(3, 8, 8))
    torch.testing.assert_close(r, BOFTLayer.cayley_batch(None, params))


def test_cayley_gradients_equal_autograd_through_the_solve():
    """The closed-form backward (from R alone) equals autograd through PEFT's solve, for gradients of the
    raw parameters and for a second derivative; an expanded (stride-0) incoming gradient too."""
    torch.manual_seed(0)
    params = (0.5 * torch.randn(2, 6, 8, 8, dtype=torch.float64)).requires_grad_(True)
    grad = torch.randn(2, 6, 8, 8, dtype=torch.float64)

    def reference(p):
        q, eye = skew_from_square(p), torch.eye(8, dtype=p.dtype)
        return torch.linalg.solve(eye + q, eye - q, left=False)

    def ours(p):  # cayley() casts to fp32; the fp64 check goes through the same Function
        from boftvision.ops.orthogonal import Cayley

        return Cayley.apply(skew_from_square(p))

    def derivatives(f):  # the gradient for ``grad``, and the gradient of that gradient's squared norm
        first = torch.autograd.grad(f(params), params, grad, create_graph=True)[0]
        return first, torch.autograd.grad((first ** 2).sum(), params)[0]

    torch.testing.assert_close(ours(params), reference(params))
    for got, want in zip(derivatives(ours), derivatives(reference)):
        torch.testing.assert_close(got, want)
    summed = torch.autograd.grad(ours(params).sum(), params)[0]
    torch.testing.assert_close(summed, torch.autograd.grad(reference(params).sum(), params)[0])


def test_neumann_matches_peft_and_approximates_the_transpose():
    torch.manual_seed(0)
    vec = 0.05 * torch.randn(6, 28)
    q = skew_from_upper(vec, 8)
    torch.testing.assert_close(upper_from_skew(q), vec)
    module = OFTRotationModule(6, 28, 8, 48)
    for terms in (1, 2, 3, 5, 8):
        ref = module._cayley_batch(vec, 8, use_cayley_neumann=True, num_neumann_terms=terms)
        torch.testing.assert_close(cayley_neumann(q, terms), ref)
    exact = cayley(q)
    # PEFT's Neumann series converges to the transpose of its exact Cayley (documented convention)
    assert (cayley_neumann(q, 12) - exact.transpose(-1, -2)).abs().max() < 1e-5
    assert (cayley_neumann(q, 12) - exact).abs().max() > 1e-2
    assert orthogonality_error(cayley_neumann(q, 5)) > orthogonality_error(exact)  # truncated: not exact


def test_full_depth_butterfly_is_dense_and_shallow_is_not():
    torch.manual_seed(0)
    d, b = 32, 2
    full = max_butterfly_factors(d, b)
    assert full == 5  # log2(32/2) + 1
    blocks = cayley(skew_from_square(torch.randn(full, d // b, b, b)))
    r = dense_rotation(blocks)
    assert (r.abs() > 1e-7).all()
    assert orthogonality_error(r.unsqueeze(0)) <= 1e-5
    shallow = dense_rotation(blocks[: full - 1])
    assert (shallow.abs() < 1e-12).float().mean() >= 0.5


def test_shape_checks():
    assert check_butterfly_shape(64, 8, 4) is None
    assert "does not divide" in check_butterfly_shape(64, 6, 1)
    assert "needs width divisible by" in check_butterfly_shape(64, 8, 5)
    assert "even" in check_butterfly_shape(63, 3, 2)


def test_multiplicative_dropout_replaces_blocks_of_one_factor():
    torch.manual_seed(0)
    blocks = cayley(skew_from_square(torch.randn(3, 10, 4, 4)))
    out = multiplicative_dropout(blocks, 0.3)
    is_eye = (out - torch.eye(4)).abs().amax((-1, -2)) < 1e-7
    assert is_eye.sum() == 3 and is_eye.any(1).sum() == 1


def test_vector_bank_admixture_and_topk_round_trip():
    torch.manual_seed(0)
    bank = torch.randn(16, 4)
    logits = torch.randn(5, 3, 16)
    top, idx = logits.topk(2, -1)
    w = torch.softmax(top, -1)
    manual = w[..., :1] * bank[idx[..., 0]] + w[..., 1:] * bank[idx[..., 1]]
    torch.testing.assert_close(admix(logits, bank, 2), manual)
    indices, weights = topk_compress(logits, 2)
    assert indices.dtype == torch.uint8 and weights.shape == (5, 3, 1)
    torch.testing.assert_close(admix(topk_expand(indices, weights, 16), bank, 2), admix(logits, bank, 2))
    a, b = lora_factors(torch.randn(2, 3, 16), torch.randn(5, 2, 16), bank, 2)
    assert a.shape == (2, 12) and b.shape == (20, 2)


@pytest.mark.parametrize("d,b,m", [(16, 2, 3), (64, 4, 3), (96, 8, 2), (32, 2, 5)])
def test_collapsed_butterfly_is_the_block_diagonal_of_r(d, b, m):
    torch.manual_seed(0)
    blocks = torch.randn(m, d // b, b, b, dtype=torch.float64)
    r, span = dense_reference(blocks), butterfly_span(b, m)
    diagonal = collapse_butterfly(blocks)
    assert diagonal.shape == (d // span, span, span)
    torch.testing.assert_close(torch.block_diag(*diagonal), r)  # and nothing outside the diagonal blocks
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(apply_factor(x, diagonal, 0), butterfly_apply(x, blocks))


@pytest.mark.parametrize("b", [2, 4, 8, 16, 32])
def test_two_product_form_equals_the_factors(b):
    """R = H·L (two block products and a fixed permutation) equals factor-by-factor application for every
    m up to the full butterfly, x R and x Rᵀ, widths of one and of three full spans, 3-D activations;
    gradients (to x and to the blocks) too."""
    from boftvision.ops.orthogonal import apply_two_product, two_product_operands

    torch.manual_seed(b)
    span = b * 16
    for width in (span, 3 * span):
        for m in range(1, max_butterfly_factors(span, b) + 1):
            blocks = cayley(skew_from_square(0.3 * torch.randn(m, width // b, b, b))).requires_grad_(True)
            x = torch.randn(2, 3, width, requires_grad=True)
            for transpose in (False, True):
                grad = torch.randn(2, 3, width)
                low, high = two_product_operands(blocks)
                ours = apply_two_product(x, low, high, m, b, transpose=transpose)
                reference = butterfly_apply(x, blocks, transpose=transpose)
                torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
                ours_grads = torch.autograd.grad(ours, (x, blocks), grad)
                for got, want in zip(ours_grads, torch.autograd.grad(reference, (x, blocks), grad)):
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_permute_copy_moves_chunks_bitwise():
    """The wide-element permuted copy equals permute().contiguous() bit for bit (NaN payloads included)
    in every dtype, and its backward is the inverse permutation."""
    from boftvision.ops.orthogonal import PermuteCopy, permute_copy

    for dtype, chunk in ((torch.float32, 4), (torch.float32, 3), (torch.bfloat16, 8), (torch.float16, 2),
                         (torch.float64, 5)):
        x = torch.randn(6, 2, 3, 4, chunk).to(dtype)
        x.view(-1)[7] = float("nan")
        dims = (1, 3, 0, 2, 4)
        want = x.permute(dims).contiguous()
        got = permute_copy(x, tuple(x.shape), dims)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    x = torch.randn(6, 8, requires_grad=True)
    y = PermuteCopy.apply(x, (3, 2, 2, 4), (1, 0, 2, 3))
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    (want,) = torch.autograd.grad(x.reshape(3, 2, 2, 4).permute(1, 0, 2, 3), x, grad)
    assert torch.equal(got, want)


def test_scaled_linear_equals_its_plain_form(monkeypatch):
    """scaled_linear equals F.linear(x, W) ⊙ s + bias with the same gradients: a frozen weight (the folded
    backward; 3-D non-contiguous input, rows in several chunks, with and without a bias) and a trained one."""
    from boftvision.ops import orthogonal
    from boftvision.ops.orthogonal import scaled_linear

    monkeypatch.setattr(orthogonal, "SCALE_CHUNK", 24)  # 3 rows of 8 per chunk: 15 rows in 5 chunks
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, dtype=torch.float64).transpose(1, 2).requires_grad_(True)  # (3, 5, 8), strided
    s = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for trained in (False, True):
        weight = torch.randn(8, 8, dtype=torch.float64, requires_grad=trained)
        for bias in (None, torch.randn(8, dtype=torch.float64, requires_grad=True)):
            inputs = [x, s] + ([] if bias is None else [bias]) + ([weight] if trained else [])
            ours = scaled_linear(x, weight, s, bias)
            reference = torch.nn.functional.linear(x, weight) * s + (0 if bias is None else bias)
            torch.testing.assert_close(ours, reference)
            grad = torch.randn_like(ours)
            for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
                torch.testing.assert_close(a, b)


def test_scale_shift_equals_its_plain_form():
    """ScaleShift equals y ⊙ s + bias with the same gradients, with and without a bias."""
    from boftvision.ops.orthogonal import scale_shift

    torch.manual_seed(0)
    y = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    s = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for bias in (None, torch.randn(7, dtype=torch.float64, requires_grad=True)):
        inputs = (y, s) if bias is None else (y, s, bias)
        ours, reference = scale_shift(y, s, bias), y * s + (0 if bias is None else bias)
        torch.testing.assert_close(ours, reference)
        grad = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
            torch.testing.assert_close(a, b)
