"""Optimizers against float64 NumPy references of numpy-ml's rules (tests/reference_optim.py).

Kernels take flat 1-D arrays, so every shape below reuses the same two compiled
specialisations (float32, float64) per kernel and twin.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nbnet import config
from nbnet.optimizers import SGD, AdaGrad, Adam, RMSProp, get_optimizer
from nbnet.schedulers import ExponentialScheduler, KingScheduler, SchedulerBase
from reference_optim import adagrad_ref, adam_ref, clip_ref, rmsprop_ref, sgd_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [np.float32, np.float64]
SHAPE = (7, 5)
N_STEPS = 6

# (constructor, kwargs, reference, reference kwargs)
CASES = {
    "sgd": (SGD, dict(lr=0.05), sgd_ref, dict(momentum=0.0)),
    "sgd_momentum": (SGD, dict(lr=0.05, momentum=0.9), sgd_ref, dict(momentum=0.9)),
    "adagrad": (AdaGrad, dict(lr=0.05, eps=1e-6), adagrad_ref, dict(eps=1e-6)),
    "rmsprop": (RMSProp, dict(lr=0.01, decay=0.8, eps=1e-6), rmsprop_ref,
                dict(decay=0.8, eps=1e-6)),
    "adam": (Adam, dict(lr=0.01, decay1=0.8, decay2=0.99, eps=1e-6), adam_ref,
             dict(decay1=0.8, decay2=0.99, eps=1e-6)),
}


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)


def grads(n_steps=N_STEPS, shape=SHAPE, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [scale * rng.standard_normal(shape) for _ in range(n_steps)]


def fresh_ref_state(name, param):
    if name == "adam":
        return {"t": 0, "mean": np.zeros(param.shape), "var": np.zeros(param.shape)}
    return np.zeros(param.shape)


def run_pair(case, dtype, clip_norm=None, grad_list=None, lrs=None, **extra):
    """Run nbnet and the reference side by side, numpy-ml style (step, then update)."""
    cls, kwargs, ref, ref_kwargs = CASES[case]
    opt = cls(**kwargs, clip_norm=clip_norm, **extra)
    rng = np.random.default_rng(1)
    param = rng.standard_normal(SHAPE).astype(dtype)
    ref_param, ref_state = param.astype(np.float64), fresh_ref_state(case, param)
    for i, g in enumerate(grad_list if grad_list is not None else grads()):
        opt.step()
        g = g.astype(dtype)
        out = opt(param, g, "W")
        assert out is param
        lr = kwargs["lr"] if lrs is None else lrs[i]
        ref_param, ref_state = ref(ref_param, g, ref_state, lr, clip_norm=clip_norm, **ref_kwargs)
    return opt, param, ref_param, ref_state


def cache_arrays(case, opt):
    entry = opt.cache["W"]
    return [entry["mean"], entry["var"]] if case == "adam" else [entry]


def ref_arrays(case, state):
    return [state["mean"], state["var"]] if case == "adam" else [state]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    opt, param, ref_param, ref_state = run_pair(case, dtype)
    assert param.dtype == dtype
    np.testing.assert_allclose(param, ref_param, **tol(dtype))
    for got, want in zip(cache_arrays(case, opt), ref_arrays(case, ref_state)):
        assert got.dtype == dtype and got.shape == SHAPE
        np.testing.assert_allclose(got, want, **tol(dtype))
    if case == "adam":
        assert opt.cache["W"]["t"] == ref_state["t"] == N_STEPS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_clip_norm(case, dtype):
    g = grads()
    norms = [np.linalg.norm(x.astype(dtype).astype(np.float64)) for x in g]
    # triggers on every step: clip_norm below every gradient norm
    clip_small = 0.5 * min(norms)
    opt, param, ref_param, ref_state = run_pair(case, dtype, clip_norm=clip_small)
    np.testing.assert_allclose(param, ref_param, **tol(dtype))
    for got, want in zip(cache_arrays(case, opt), ref_arrays(case, ref_state)):
        np.testing.assert_allclose(got, want, **tol(dtype))
    _, unclipped, _, _ = run_pair(case, dtype)
    assert not np.allclose(param, unclipped, rtol=1e-3, atol=0)  # clipping changed the result
    # never triggers: clip_norm above every gradient norm gives the unclipped bits
    _, param_big, _, _ = run_pair(case, dtype, clip_norm=2.0 * max(norms))
    np.testing.assert_array_equal(param_big, unclipped)


def test_clip_reference_is_norm_scaling():
    # the reference itself: a clipped gradient has norm clip_norm and the same direction
    g = grads(1)[0]
    clipped = clip_ref(g, 0.3)
    assert np.linalg.norm(clipped) == pytest.approx(0.3, rel=1e-14)
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), g / np.linalg.norm(g))


def test_parallel_twin_matches_reference(monkeypatch):
    # force the parallel twins with many blocks/chunks on a small array
    monkeypatch.setattr(config, "SERIAL_CUTOFF", 0)
    monkeypatch.setattr(config, "CHUNK_BYTES", 32)  # 8 float32 elements per block/chunk
    g = grads()
    clip = 0.5 * min(np.linalg.norm(x.astype(np.float32).astype(np.float64)) for x in g)
    for case in CASES:
        opt, param, ref_param, ref_state = run_pair(case, np.float32, clip_norm=clip)
        np.testing.assert_allclose(param, ref_param, **tol(np.float32))
        for got, want in zip(cache_arrays(case, opt), ref_arrays(case, ref_state)):
            np.testing.assert_allclose(got, want, **tol(np.float32))


def test_scheduler_drives_lr():
    hp = dict(initial_lr=0.1, stage_length=2, staircase=False, decay=0.5)
    lrs = [ExponentialScheduler(**hp)(step) for step in range(1, N_STEPS + 1)]
    opt, param, ref_param, _ = run_pair("sgd_momentum", np.float64, lrs=lrs,
                                        lr_scheduler=ExponentialScheduler(**hp))
    np.testing.assert_allclose(param, ref_param, **tol(np.float64))
    assert len(set(lrs)) == N_STEPS  # the rate really changed every step
    # the same via a string spec
    opt2, param2, _, _ = run_pair("sgd_momentum", np.float64, lrs=lrs,
                                  lr_scheduler="exponential(initial_lr=0.1, stage_length=2, "
                                               "decay=0.5)")
    np.testing.assert_array_equal(param2, param)
    assert opt2.hyperparameters["lr_scheduler"] == str(ExponentialScheduler(**hp))


def test_king_scheduler_gets_cur_loss():
    opt = SGD(lr_scheduler=KingScheduler(initial_lr=0.1, patience=3))
    param = np.ones(4)
    with pytest.raises(ValueError, match="cur_loss"):
        opt(param, np.ones(4), "W")
    np.testing.assert_array_equal(param, np.ones(4))
    assert "W" not in opt.cache
    opt(param, np.ones(4), "W", cur_loss=2.0)
    np.testing.assert_allclose(param, 1.0 - 0.1)
    assert opt.lr_scheduler.loss_history == [2.0]


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    # torch.optim.Adam: p -= lr * m_hat / (sqrt(v_hat) + eps), the same as numpy-ml's rule
    lr, betas, eps = 0.01, (0.8, 0.99), 1e-7
    rng = np.random.default_rng(3)
    start = rng.standard_normal(SHAPE)
    param = start.copy()
    tparam = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    topt = torch.optim.Adam([tparam], lr=lr, betas=betas, eps=eps, foreach=False)
    opt = Adam(lr=lr, decay1=betas[0], decay2=betas[1], eps=eps)
    for g in grads(8, seed=4):
        opt.step()
        opt(param, g, "W")
        tparam.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
    np.testing.assert_allclose(param, tparam.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert not np.allclose(param, start)


def test_several_parameters_keep_separate_state():
    opt = Adam(lr=0.01)
    W, b = np.zeros((3, 2)), np.zeros(2)
    gW, gb = grads(2, (3, 2)), grads(1, (2,), seed=9)
    opt.step()
    opt(W, gW[0], "W")
    opt(b, gb[0], "b")
    opt.step()
    opt(W, gW[1], "W")
    assert opt.cache["W"]["t"] == 2 and opt.cache["b"]["t"] == 1
    ref_b, _ = adam_ref(np.zeros(2), gb[0], fresh_ref_state("adam", b), 0.01)
    np.testing.assert_allclose(b, ref_b, rtol=1e-12)


def test_noncontiguous_and_0d_params_updated_in_place():
    base = np.ones((4, 6))
    view = base[:, ::2]  # not contiguous
    g = np.arange(12.0).reshape(4, 3)
    SGD(lr=0.1)(view, g, "W")
    np.testing.assert_allclose(base[:, ::2], 1.0 - 0.1 * g)
    np.testing.assert_array_equal(base[:, 1::2], 1.0)  # untouched
    scalar = np.array(2.0)
    SGD(lr=0.5)(scalar, np.array(1.0), "s")
    assert scalar == 1.5


def test_grad_dtype_casting():
    g64 = grads(1)[0]
    a = np.ones(SHAPE, np.float32)
    b = np.ones(SHAPE, np.float32)
    SGD(lr=0.1)(a, g64, "W")  # float64 gradient for a float32 parameter: cast first
    SGD(lr=0.1)(b, g64.astype(np.float32), "W")
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    c = np.ones(3)
    SGD(lr=0.5)(c, np.array([1, 2, 3]), "W")  # integers are castable
    np.testing.assert_allclose(c, [0.5, 0.0, -0.5])
    with pytest.raises(TypeError):
        SGD()(np.ones(3), np.ones(3, dtype=np.complex128), "W")
    with pytest.raises(TypeError):
        SGD()(np.ones(3, dtype=np.int64), np.ones(3), "W")
    with pytest.raises(TypeError):
        SGD()([1.0, 2.0], [1.0, 2.0], "W")


@pytest.mark.parametrize("case", list(CASES))
def test_nan_gradient_propagates(case):
    g = grads(1)[0]
    g[2, 3] = np.nan
    clip = 1e-3  # would clip if the norm were finite: NaN > clip is False, as in numpy-ml
    opt, param, ref_param, _ = run_pair(case, np.float64, clip_norm=clip, grad_list=[g])
    assert np.isnan(param[2, 3])
    assert np.isfinite(np.delete(param.ravel(), 2 * SHAPE[1] + 3)).all()
    np.testing.assert_allclose(param, ref_param, rtol=1e-12, atol=1e-14, equal_nan=True)


def snapshot(opt, param):
    return param.copy(), opt.state_dict()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_shape_mismatch_changes_nothing(case):
    opt, param, _, _ = run_pair(case, np.float64, grad_list=grads(2))
    before_param, before_state = snapshot(opt, param)
    with pytest.raises(ValueError) as info:
        opt(param, np.ones((5, 7)), "W")
    assert "(7, 5)" in str(info.value) and "(5, 7)" in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        opt(np.ones(3), np.ones(4), "new")
    assert "new" not in opt.cache
    # the same name reused for a parameter of another size
    with pytest.raises(ValueError, match="W"):
        opt(np.ones(4), np.ones(4), "W")
    np.testing.assert_array_equal(param, before_param)
    assert_same_state(opt.state_dict(), before_state)


class _Fixed(SchedulerBase):
    _id = "Fixed"

    def __init__(self, value):
        self.value = value

    def learning_rate(self, step=None, cur_loss=None):
        return self.value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.01])
def test_bad_learning_rate_changes_nothing(bad):
    with pytest.raises(ValueError):
        SGD(lr=bad)
    with pytest.raises(ValueError):
        get_optimizer(f"adam(lr={bad!r})" if np.isfinite(bad) else {"id": "Adam", "lr": bad})
    sched = _Fixed(0.01)
    opt = Adam(lr_scheduler=sched)
    param = np.ones(SHAPE)
    opt.step()
    opt(param, grads(1)[0], "W")
    before_param, before_state = snapshot(opt, param)
    sched.value = bad
    with pytest.raises(ValueError, match="learning rate"):
        opt(param, grads(1)[0], "W")
    with pytest.raises(ValueError, match="learning rate"):
        opt(np.ones(3), np.ones(3), "b")
    np.testing.assert_array_equal(param, before_param)
    assert_same_state(opt.state_dict(), before_state)
    assert "b" not in opt.cache and opt.cache["W"]["t"] == 1


def test_bad_hyperparameters():
    for make in (lambda: SGD(momentum=-1), lambda: SGD(clip_norm=0), lambda: SGD(clip_norm=-1),
                 lambda: AdaGrad(eps=-1), lambda: RMSProp(decay=1.5), lambda: Adam(decay1=1.0),
                 lambda: Adam(decay2=-0.1), lambda: Adam(eps=float("nan")),
                 lambda: SGD(lr=None)):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError):
        SGD(bogus=1)


def test_readonly_param_rejected():
    param = np.ones(3)
    param.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        SGD()(param, np.ones(3), "W")


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("spec, cls, expect", [
    (None, SGD, {"lr": 0.01, "momentum": 0.0, "clip_norm": None}),
    ("adam", Adam, {"lr": 0.001, "decay1": 0.9, "decay2": 0.999, "eps": 1e-7}),
    ("sgd(lr=0.1, momentum=0.9)", SGD, {"lr": 0.1, "momentum": 0.9}),
    ("rmsprop(lr=0.01)", RMSProp, {"lr": 0.01, "decay": 0.9, "eps": 1e-7}),
    ("adagrad", AdaGrad, {"lr": 0.01, "eps": 1e-7}),
    ("Adam(lr=0.002, clip_norm=5, eps=1e-8)", Adam, {"lr": 0.002, "clip_norm": 5, "eps": 1e-8}),
    ("sgd(clip_norm=none)", SGD, {"clip_norm": None}),
    ("sgd(lr=0.1, lr_scheduler=exponential(initial_lr=0.1, stage_length=10))", SGD,
     {"lr_scheduler": "ExponentialScheduler(initial_lr=0.1, stage_length=10, staircase=False, "
                      "decay=0.1)"}),
    ("sgd(lr_scheduler='noam(warmup_steps=5)')", SGD,
     {"lr_scheduler": "NoamScheduler(model_dim=512, scale_factor=1, warmup_steps=5)"}),
    ({"id": "Adam", "lr": 0.01, "decay1": 0.5}, Adam, {"lr": 0.01, "decay1": 0.5}),
    ({"hyperparameters": {"id": "RMSProp", "lr": 0.02, "decay": 0.5}}, RMSProp,
     {"lr": 0.02, "decay": 0.5}),
])
def test_get_optimizer_specs(spec, cls, expect):
    opt = get_optimizer(spec)
    assert type(opt) is cls
    hp = opt.hyperparameters
    assert hp["id"] == cls.__name__
    for key, value in expect.items():
        assert hp[key] == value
    assert opt.cache == {} and opt.cur_step == 0


@pytest.mark.parametrize("opt", [
    SGD(lr=0.2, momentum=0.5, clip_norm=3.0), AdaGrad(lr=0.3, eps=1e-5),
    RMSProp(decay=0.7, lr_scheduler="king(patience=7)"),
    Adam(lr=0.004, decay1=0.85, lr_scheduler=ExponentialScheduler(0.1, 3, True, 0.5))])
def test_round_trips_through_str_and_hyperparameters(opt):
    assert get_optimizer(str(opt)).hyperparameters == opt.hyperparameters
    assert get_optimizer(opt.hyperparameters).hyperparameters == opt.hyperparameters
    assert get_optimizer({"cache": {}, "hyperparameters": opt.hyperparameters}
                         ).hyperparameters == opt.hyperparameters


def test_numpy_ml_dict_with_cache():
    W = np.ones(SHAPE)
    mean, var = 0.1 * np.ones(SHAPE), 0.2 * np.ones(SHAPE)
    opt = get_optimizer({"cache": {"W": {"t": 3, "mean": mean, "var": var}},
                         "hyperparameters": {"id": "Adam", "lr": 0.01}})
    assert opt.cache["W"]["t"] == 3
    g = grads(1)[0]
    opt(W, g, "W")
    want, _ = adam_ref(np.ones(SHAPE), g, {"t": 3, "mean": mean, "var": var}, 0.01)
    np.testing.assert_allclose(W, want, rtol=1e-12)
    sgd = get_optimizer({"cache": {"W": np.full(SHAPE, 0.5)},
                         "hyperparameters": {"id": "SGD", "lr": 0.1, "momentum": 0.5}})
    W = np.ones(SHAPE)
    sgd(W, g, "W")
    want, _ = sgd_ref(np.ones(SHAPE), g, np.full(SHAPE, 0.5), 0.1, momentum=0.5)
    np.testing.assert_allclose(W, want, rtol=1e-12)


@pytest.mark.parametrize("spec", [
    "adamw", "sgd(lr=0.1", "sgd(0.1)", "sgd(bogus=1)", "sgd(lr=__import__('os').getcwd())",
    "sgd(lr=0.1, lr_scheduler=cosine(lr=1))", "sgd(lr=1, lr=2)", "sgd(**{'lr': 1})",
    "", "sgd(lr=0.1)(momentum=0.5)", "adam(decay1=1)", "sgd(lr=[0.1])",
    {"id": "Nadam"}, {"lr": 0.1}, {"hyperparameters": {"id": "SGD"}, "extra": 1},
    {"id": "SGD", "bogus": 1},
])
def test_bad_optimizer_specs(spec):
    with pytest.raises(ValueError):
        get_optimizer(spec)


def test_get_optimizer_object_returns_independent_copy():
    sched = KingScheduler(initial_lr=0.1, patience=4)
    opt = SGD(lr=0.1, momentum=0.9, lr_scheduler=sched)
    opt.device = "cpu"
    W = np.ones(3)
    opt.step()
    opt(W, np.ones(3), "W", cur_loss=1.0)
    for twin in (opt.copy(), get_optimizer(opt)):
        assert twin is not opt and type(twin) is SGD
        assert twin.hyperparameters == opt.hyperparameters
        assert twin.cache == {} and twin.cur_step == 0
        assert twin.lr_scheduler is not sched and twin.lr_scheduler.loss_history == []
        V = np.ones(3)
        twin(V, 5 * np.ones(3), "W", cur_loss=3.0)
        assert sched.loss_history == [1.0]
    np.testing.assert_allclose(opt.cache["W"], 0.1)  # the original's momentum is intact
    with pytest.raises(TypeError):
        get_optimizer(3)


def test_to_cpu_keeps_state_and_unknown_device_raises():
    opt, param, _, _ = run_pair("adam", np.float64, grad_list=grads(2))
    before = opt.state_dict()
    assert opt.to("cpu") is opt and opt.device == "cpu"
    assert_same_state(opt.state_dict(), before)
    with pytest.raises(ValueError):
        opt.to("tpu")
    assert opt.device == "cpu"
    assert_same_state(opt.state_dict(), before)


def test_reset_and_step():
    opt = Adam(lr_scheduler=KingScheduler(patience=3))
    opt.step()
    opt.step()
    opt(np.ones(2), np.ones(2), "W", cur_loss=1.0)
    assert opt.cur_step == 2 and "W" in opt.cache
    opt.reset()
    assert opt.cur_step == 0 and opt.cache == {} and opt.lr_scheduler.loss_history == []


# ------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_continues_identically(case, dtype):
    extra = {"lr_scheduler": KingScheduler(initial_lr=0.05, patience=2)} if case == "sgd" else {}
    g = grads(8, seed=5)
    losses = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    cls, kwargs, _, _ = CASES[case]
    opt = cls(**kwargs, **extra)
    param = np.ones(SHAPE, dtype)
    for i in range(4):
        opt.step()
        opt(param, g[i].astype(dtype), "W", cur_loss=losses[i])
    state = opt.state_dict()
    for key, value in state.items():
        assert isinstance(value, (np.ndarray, int, float)), key
    assert state["cur_step"] == 4
    assert any(k.startswith("cache/W/") for k in state)
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    resumed = get_optimizer(opt.hyperparameters)
    resumed.load_state_dict(state)
    param2 = param.copy()
    for i in range(4, 8):
        for o, p in ((opt, param), (resumed, param2)):
            o.step()
            o(p, g[i].astype(dtype), "W", cur_loss=losses[i])
    np.testing.assert_array_equal(param2, param)
    assert_same_state(resumed.state_dict(), opt.state_dict())
    assert_same_state(state, saved)  # the state dict holds copies, not live arrays
    if case == "sgd":
        assert opt.lr_scheduler.current_lr < 0.05  # the scheduler's history mattered


def test_load_state_dict_rejects_bad_input_unchanged():
    opt, param, _, _ = run_pair("adam", np.float64, grad_list=grads(2))
    before = opt.state_dict()
    for bad in ({"cache/W/mean": np.zeros(3)},  # no cur_step
                {"cur_step": -1},
                {"cur_step": 1, "cache/W/mean": np.zeros(3)},  # t and var missing
                {"cur_step": 1, "bogus": 1},
                {"cur_step": 1, "cache/W/t": 1, "cache/W/mean": np.zeros(3),
                 "cache/W/var": np.zeros(3, dtype=np.int64)},
                {"cur_step": 1, "lr_scheduler/current_lr": 0.5}):
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
        assert_same_state(opt.state_dict(), before)


# ------------------------------------------------------------------ sum_of_squares

_SUMSQ_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import numba
    from nbnet.kernels.cpu.optimizers import sum_of_squares
    assert numba.get_num_threads() == int(sys.argv[1])
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(100_003) * 1e3 + 5.0).astype(dtype)
        chunk = 997
        partial = np.empty((x.size + chunk - 1) // chunk)
        out = np.empty(1)
        sum_of_squares.parallel(x, chunk, partial, out)
        print(out.tobytes().hex(), partial.tobytes().hex())
""")


def test_sum_of_squares_deterministic_across_thread_counts():
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads, NBNET_SERIAL_CUTOFF="0")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-c", _SUMSQ_SCRIPT, threads], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(proc.stdout)
    assert results[0].strip() and results[0] == results[1]


def test_sum_of_squares_value():
    from nbnet.kernels.cpu.optimizers import sum_of_squares
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1001).astype(np.float32)
    chunk = 100
    partial, out = np.empty(11), np.empty(1)
    sum_of_squares.serial(x, chunk, partial, out)
    x64 = x.astype(np.float64)
    assert out[0] == pytest.approx(float(np.dot(x64, x64)), rel=1e-13)
    chunks = np.split(x64, range(chunk, x.size, chunk))
    np.testing.assert_allclose(partial, [np.dot(c, c) for c in chunks], rtol=1e-13)
    sum_of_squares.serial(x[:0], chunk, partial[:0], out)
    assert out[0] == 0.0


def test_clip_norm_of_huge_float64_gradients_does_not_overflow():
    """sum(g**2) overflows float64 beyond |g| ~ 1e154; the clipped step must still be the
    gradient scaled to norm clip_norm (not zeroed by clip_norm / inf)."""
    rng = np.random.default_rng(3)
    g = rng.normal(size=50) * 1e200
    amax = np.abs(g).max()
    norm_over_amax = np.sqrt(np.sum((g / amax) ** 2))  # ||g|| / amax, without overflow
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(g * g))  # the naive reduction does overflow
    opt = SGD(lr=1.0, clip_norm=2.0)
    param = np.zeros_like(g)
    opt(param, g.copy(), "W")
    expected = -(2.0 / amax) / norm_over_amax * g
    np.testing.assert_allclose(param, expected, rtol=1e-12)
    assert np.linalg.norm(param) == pytest.approx(2.0, rel=1e-12)
    # an infinite entry still poisons the step (numpy-ml's behaviour), it is not hidden
    g_inf = g.copy()
    g_inf[0] = np.inf
    param = np.zeros_like(g)
    opt(param, g_inf, "W2")
    assert not np.all(np.isfinite(param))
