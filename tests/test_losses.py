"""SquaredError and CrossEntropy against float64 references, finite differences, PyTorch."""
import numpy as np
import pytest

import reference_train as ref
from nbnet.layers import Tanh
from nbnet.losses import CrossEntropy, SquaredError, get_loss

torch = None
try:
    import torch
except ImportError:  # pragma: no cover
    pass
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _logits(shape, dtype=np.float64, seed=0, scale=3.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3000, 4)])
def test_squared_error(dtype, reduction, shape):
    Y = _logits(shape, dtype)
    T = _logits(shape, dtype, seed=1)
    loss = SquaredError(reduction=reduction)
    want_loss, want_grad = ref.squared_error_ref(T, Y, reduction)
    assert np.isclose(loss.loss(T, Y), want_loss, rtol=1e-5 if dtype == np.float32 else 1e-12)
    g = loss.grad(T, Y)
    assert g.dtype == dtype
    np.testing.assert_allclose(g, want_grad, **TOL[dtype])
    lv, lg = loss.loss_and_grad(T, Y)
    assert lv == loss.loss(T, Y)
    np.testing.assert_array_equal(lg, g)


def test_squared_error_numpy_ml_grad_with_activation():
    Z = _logits((5, 2))
    act = Tanh()
    Y = act.fn(Z)
    T = _logits((5, 2), seed=2)
    g = SquaredError().grad(T, Y, Z, act)
    np.testing.assert_allclose(g, (Y - T) * (1 - np.tanh(Z) ** 2), rtol=1e-12)
    num = ref.numerical_grad(lambda: SquaredError().loss(T, np.tanh(Z)), Z)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


def test_squared_error_accepts_1d_targets_for_one_output():
    Y = _logits((6, 1))
    T = _logits(6, seed=1)
    assert np.isclose(SquaredError().loss(T, Y), ref.squared_error_ref(T.reshape(-1, 1), Y)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("N,C", [(1, 2), (9, 5), (2000, 10)])
def test_cross_entropy_from_logits(dtype, reduction, N, C):
    Z = _logits((N, C), dtype)
    labels = np.random.default_rng(1).integers(0, C, N)
    T = ref.one_hot(labels, C)
    ce = CrossEntropy(from_logits=True, reduction=reduction)
    want_loss, want_grad = ref.cross_entropy_logits_ref(T, Z, reduction)
    for target in (labels, T.astype(dtype)):
        lv, g = ce.loss_and_grad(target, Z)
        assert np.isclose(lv, want_loss, rtol=1e-5 if dtype == np.float32 else 1e-11)
        assert g.dtype == dtype
        np.testing.assert_allclose(g, want_grad, **TOL[dtype])
        assert ce.loss(target, Z) == lv


def test_cross_entropy_soft_targets_and_finite_differences():
    Z = _logits((4, 6))
    T = np.random.default_rng(3).dirichlet(np.ones(6), size=4)
    ce = CrossEntropy(from_logits=True)
    g = ce.grad(T, Z)
    np.testing.assert_allclose(g, ref.numerical_grad(lambda: ce.loss(T, Z), Z), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ce.loss(T, Z), ref.cross_entropy_logits_ref(T, Z)[0], rtol=1e-12)


def test_cross_entropy_numpy_ml_probability_form():
    Z = _logits((6, 4))
    P = ref.softmax_ref(Z)
    labels = np.array([0, 1, 2, 3, 0, 1])
    T = ref.one_hot(labels, 4)
    ce = CrossEntropy()  # numpy-ml's defaults: probabilities, sum
    want_loss, want_grad = ref.cross_entropy_probs_ref(T, P)
    assert np.isclose(ce.loss(T, P), want_loss, rtol=1e-12)
    np.testing.assert_allclose(ce.grad(T, P), want_grad, rtol=1e-12)
    assert np.isclose(ce.loss(labels, P), want_loss, rtol=1e-12)
    np.testing.assert_allclose(ce.grad(labels, P), want_grad, rtol=1e-12)
    # the numpy-ml gradient is the gradient at the softmax input
    np.testing.assert_allclose(ce.grad(T, P), ref.numerical_grad(lambda: ce.loss(T, ref.softmax_ref(Z)), Z),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_probability_form_rejects_logits(dtype):
    """Logits (or anything outside [0, 1]) given to the probability form are an error that
    points to from_logits=True: the loss would be finite and wrong, negative for p > 1."""
    Z = _logits((5, 4)).astype(dtype)
    labels = np.array([0, 1, 2, 3, 0])
    ce = CrossEntropy()
    for bad in (Z, np.abs(Z) + 1.5, -ref.softmax_ref(Z).astype(dtype)):
        with pytest.raises(ValueError, match=r"takes probabilities in \[0, 1\].*from_logits=True"):
            ce.loss(labels, bad)
        with pytest.raises(ValueError, match="from_logits=True"):
            ce.grad(labels, bad)
    # exact 0 and 1 (a saturated softmax) and the float32 softmax itself are probabilities
    P = ref.softmax_ref(Z).astype(dtype)
    P[0] = 0.0
    P[0, 0] = 1.0
    assert np.isfinite(ce.loss(labels, P))


def test_cross_entropy_is_stable_for_huge_logits():
    Z = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4 - 20]], np.float32)
    labels = np.array([2, 2])
    ce = CrossEntropy(from_logits=True, reduction="sum")
    lv, g = ce.loss_and_grad(labels, Z)
    assert np.isfinite(lv) and np.isfinite(g).all()
    assert np.isclose(lv, 2e4 + 20, rtol=1e-6)
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_torch(dtype):
    Z = _logits((64, 10), dtype, scale=5)
    labels = np.random.default_rng(1).integers(0, 10, 64)
    Zt = torch.from_numpy(Z).requires_grad_(True)
    lt = torch.nn.CrossEntropyLoss()(Zt, torch.from_numpy(labels))
    lt.backward()
    lv, g = CrossEntropy(from_logits=True, reduction="mean").loss_and_grad(labels, Z)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lv, lt.item(), **tol)
    np.testing.assert_allclose(g, Zt.grad.numpy(), **tol)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_squared_error_matches_torch_mse(dtype):
    Y = _logits((32, 3), dtype)
    T = _logits((32, 3), dtype, seed=1)
    Yt = torch.from_numpy(Y).requires_grad_(True)
    lt = 0.5 * torch.nn.MSELoss(reduction="sum")(Yt, torch.from_numpy(T))
    lt.backward()
    lv, g = SquaredError().loss_and_grad(T, Y)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lv, lt.item(), **tol)
    np.testing.assert_allclose(g, Yt.grad.numpy(), **tol)
    # reduction="mean" divides by the number of rows
    mean = torch.nn.MSELoss(reduction="mean")(torch.from_numpy(Y), torch.from_numpy(T)).item()
    np.testing.assert_allclose(SquaredError(reduction="mean").loss(T, Y), 0.5 * mean * 3, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targets", ["labels", "onehot", "soft"])
def test_cross_entropy_masked_logits(dtype, targets):
    """-inf logits mask classes (the idiom of attention masks and constrained decoding):
    the loss and gradient equal those over the unmasked classes alone, and the masked
    classes get a zero gradient."""
    rng = np.random.default_rng(3)
    N, C = 6, 5
    Z = _logits((N, C), dtype, scale=3)
    mask = np.zeros((N, C), bool)
    mask[0, [1, 3]] = mask[2, 0] = mask[5, [0, 1, 2, 4]] = True  # row 5 keeps class 3 only
    labels = np.array([0, 4, 1, 2, 3, 3])
    if targets == "labels":
        T = labels
    else:
        T = ref.one_hot(labels, C).astype(dtype)
        if targets == "soft":  # weight spread over unmasked classes only
            W = rng.uniform(0.1, 1.0, (N, C)) * ~mask
            T = (W / W.sum(axis=1, keepdims=True)).astype(dtype)
    Zm = np.where(mask, -np.inf, Z).astype(dtype)
    ce = CrossEntropy(from_logits=True, reduction="sum")
    lv, g = ce.loss_and_grad(T, Zm)
    Tf = ref.one_hot(labels, C) if targets == "labels" else np.asarray(T, np.float64)
    want_loss, want_grad = 0.0, np.zeros((N, C))
    for i in range(N):  # the reference: each row restricted to its unmasked classes
        keep = ~mask[i]
        z = Z[i, keep].astype(np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        want_loss -= float((Tf[i, keep] * np.log(p)).sum())
        want_grad[i, keep] = p * Tf[i, keep].sum() - Tf[i, keep]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert np.isfinite(lv) and np.isfinite(g).all()
    np.testing.assert_allclose(lv, want_loss, **tol)
    np.testing.assert_allclose(g, want_grad, **tol)
    assert (g[mask] == 0).all()
    if torch is not None and targets != "soft":
        lt = torch.nn.functional.cross_entropy(torch.from_numpy(Zm), torch.from_numpy(labels),
                                               reduction="sum")
        np.testing.assert_allclose(lv, lt.item(), **tol)


def test_cross_entropy_masked_logits_errors():
    """A row with every class masked, or a target on a masked class, has no finite loss:
    one ValueError naming where; NaN and +inf logits stay errors, and so does -inf in
    numpy-ml's probability form."""
    Z = _logits((3, 4))
    ce = CrossEntropy(from_logits=True)
    all_masked = Z.copy()
    all_masked[1] = -np.inf
    with pytest.raises(ValueError, match="row 1 has no finite logit"):
        ce.loss(np.array([0, 1, 2]), all_masked)
    target_masked = Z.copy()
    target_masked[2, 3] = -np.inf
    with pytest.raises(ValueError, match=r"weight on a -inf logit \(y_pred at \[2, 3\]\)"):
        ce.loss(np.array([0, 1, 3]), target_masked)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        ce.grad(ref.one_hot([0, 1, 3], 4), target_masked)
    ce.loss(ref.one_hot([0, 1, 2], 4), target_masked)  # weight 0 there: fine
    plus = target_masked.copy()
    plus[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\+inf \(at index \[0, 0\]\)"):
        ce.loss(np.array([0, 1, 2]), plus)
    with pytest.raises(ValueError, match="y_pred contains inf"):
        CrossEntropy().loss(np.array([0, 1, 2]), np.where(np.isinf(target_masked), -np.inf,
                                                           np.full_like(Z, 0.25)))


@pytest.mark.parametrize("loss", [SquaredError(), CrossEntropy(), CrossEntropy(from_logits=True)])
def test_validation_errors(loss):
    Y = _logits((4, 3))
    T = ref.one_hot([0, 1, 2, 0], 3)
    with pytest.raises(ValueError, match="shape"):
        loss.loss(T[:, :2], Y)
    bad = Y.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="y_pred contains NaN"):
        loss.grad(T, bad)
    badT = T.copy()
    badT[0, 0] = np.nan
    with pytest.raises(ValueError, match="y contains NaN"):
        loss.loss(badT, Y)
    with pytest.raises(TypeError):
        loss.loss(T, np.array([["a"] * 3] * 4))


def test_label_validation():
    Z = _logits((4, 3))
    ce = CrossEntropy(from_logits=True)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ce.loss(np.array([0, 1, 3, 0]), Z)
    with pytest.raises(ValueError, match="labels"):
        ce.loss(np.array([0, 1, 2]), Z)
    with pytest.raises(ValueError, match="integer"):
        ce.loss(np.array([0.5, 1, 2, 0]), Z)
    with pytest.raises(ValueError, match="2-D"):
        ce.loss(np.array([0]), np.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropy(reduction="avg")


def test_get_loss():
    ce = get_loss("cross_entropy")
    assert isinstance(ce, CrossEntropy) and ce.from_logits and ce.reduction == "mean"
    se = get_loss("squared_error")
    assert isinstance(se, SquaredError) and se.reduction == "mean"
    assert isinstance(get_loss(ce.hyperparameters), CrossEntropy)
    assert get_loss(ce) is ce
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
    with pytest.raises(TypeError):
        get_loss(3)
