"""Learning-rate schedulers against numpy-ml's formulas (tests/reference_optim.py)."""
import math

import numpy as np
import pytest

from nbnet.schedulers import (ConstantScheduler, ExponentialScheduler, KingScheduler,
                              NoamScheduler, SchedulerBase, get_scheduler)
from reference_optim import KingRef, exponential_lr_ref, noam_lr_ref


def test_defaults_are_numpy_ml_defaults():
    # numpy-ml's documented defaults
    assert ConstantScheduler().hyperparameters == {"id": "ConstantScheduler", "lr": 0.01}
    assert ExponentialScheduler().hyperparameters == {
        "id": "ExponentialScheduler", "initial_lr": 0.01, "stage_length": 500,
        "staircase": False, "decay": 0.1}
    assert NoamScheduler().hyperparameters == {
        "id": "NoamScheduler", "model_dim": 512, "scale_factor": 1, "warmup_steps": 4000}
    assert KingScheduler().hyperparameters == {
        "id": "KingScheduler", "initial_lr": 0.01, "patience": 1000, "decay": 0.99}


def test_constant_ignores_step_and_loss():
    sched = ConstantScheduler(lr=0.25)
    assert {sched(step) for step in (0, 1, 17, 10**6)} == {0.25}
    assert sched(3, cur_loss=1.5) == 0.25


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_matches_formula(staircase):
    hp = dict(initial_lr=0.3, stage_length=7, staircase=staircase, decay=0.5)
    sched = ExponentialScheduler(**hp)
    steps = [0, 1, 6, 7, 8, 13, 14, 50, 701]
    got = [sched(s) for s in steps]
    want = [exponential_lr_ref(s, **hp) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert got[0] == hp["initial_lr"]
    if staircase:  # constant within a stage, one decay per stage boundary
        assert got[1] == got[2] == hp["initial_lr"]
        assert got[3] == got[4] == hp["initial_lr"] * hp["decay"]
    else:
        assert got[0] > got[1] > got[2] > got[3]


def test_noam_matches_formula_and_peaks_at_warmup():
    hp = dict(model_dim=64, scale_factor=2.0, warmup_steps=10)
    sched = NoamScheduler(**hp)
    steps = list(range(1, 40))
    got = np.array([sched(s) for s in steps])
    np.testing.assert_allclose(got, [noam_lr_ref(s, **hp) for s in steps], rtol=1e-14)
    assert steps[int(np.argmax(got))] == hp["warmup_steps"]
    assert sched(0) == 0.0  # the limit of the formula (numpy-ml divides by zero there)


def _king_losses(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    noise = 0.01 * rng.standard_normal(n)
    if kind == "decreasing":
        return list(5.0 - 0.05 * np.arange(n) + noise)
    if kind == "flat":
        return list(1.0 + noise)
    return list(1.0 + 0.01 * np.arange(n) + noise)  # increasing


@pytest.mark.parametrize("kind", ["decreasing", "flat", "increasing"])
def test_king_matches_reference(kind):
    hp = dict(initial_lr=0.1, patience=10, decay=0.5)
    sched, ref = KingScheduler(**hp), KingRef(**hp)
    losses = _king_losses(kind, 60)
    got = [sched(step, cur_loss=loss) for step, loss in enumerate(losses)]
    want = [ref(step, loss) for step, loss in enumerate(losses)]
    assert got == want
    if kind == "decreasing":
        assert set(got) == {hp["initial_lr"]}
    else:
        assert got[-1] < hp["initial_lr"]
    assert len(sched.loss_history) <= sched.max_history


def test_king_needs_loss_and_state_round_trip():
    sched = KingScheduler(initial_lr=0.1, patience=5, decay=0.5)
    with pytest.raises(ValueError, match="cur_loss"):
        sched(0)
    losses = _king_losses("flat", 40, seed=1)
    for step, loss in enumerate(losses[:20]):
        sched(step, cur_loss=loss)
    state = sched.state_dict()
    assert isinstance(state["loss_history"], np.ndarray)
    for bad in (np.nan, np.inf):  # a NaN in the history would stop every later decay
        with pytest.raises(ValueError, match="finite cur_loss"):
            sched(20, cur_loss=bad)
    np.testing.assert_array_equal(sched.state_dict()["loss_history"], state["loss_history"])
    other = KingScheduler(initial_lr=0.1, patience=5, decay=0.5)
    other.load_state_dict(state)
    a = [sched(s, cur_loss=v) for s, v in enumerate(losses[20:], 20)]
    b = [other(s, cur_loss=v) for s, v in enumerate(losses[20:], 20)]
    assert a == b
    with pytest.raises(ValueError, match="unknown"):
        other.load_state_dict({"bogus": 1.0})


def test_copy_is_fresh():
    sched = KingScheduler(initial_lr=0.1, patience=3, decay=0.5)
    for step, loss in enumerate(_king_losses("increasing", 12)):
        sched(step, cur_loss=loss)
    assert sched.current_lr < 0.1
    twin = sched.copy()
    assert twin is not sched and twin.hyperparameters == sched.hyperparameters
    assert twin.loss_history == [] and twin.current_lr == 0.1
    exp = ExponentialScheduler(initial_lr=0.2, stage_length=3)
    assert exp.copy() == exp and exp.copy() is not exp


@pytest.mark.parametrize("spec, cls, expect", [
    ("constant(lr=0.1)", ConstantScheduler, {"lr": 0.1}),
    ("exponential(initial_lr=0.01, stage_length=100)", ExponentialScheduler,
     {"initial_lr": 0.01, "stage_length": 100, "staircase": False}),
    ("Exponential(staircase=true, decay=0.5)", ExponentialScheduler,
     {"staircase": True, "decay": 0.5}),
    ("noam(model_dim=64, warmup_steps=100)", NoamScheduler,
     {"model_dim": 64, "warmup_steps": 100}),
    ("king(patience=20)", KingScheduler, {"patience": 20}),
    ("king", KingScheduler, {}),
    ("ConstantScheduler(lr=0.5)", ConstantScheduler, {"lr": 0.5}),
])
def test_get_scheduler_from_string(spec, cls, expect):
    sched = get_scheduler(spec)
    assert type(sched) is cls
    for key, value in expect.items():
        assert sched.hyperparameters[key] == value


@pytest.mark.parametrize("sched", [
    ConstantScheduler(0.3), ExponentialScheduler(0.2, 30, True, 0.7),
    NoamScheduler(128, 0.5, 50), KingScheduler(0.05, 12, 0.9)])
def test_str_and_dict_round_trip(sched):
    assert get_scheduler(str(sched)) == sched
    assert get_scheduler(sched.hyperparameters) == sched
    assert get_scheduler({"hyperparameters": sched.hyperparameters}) == sched


def test_get_scheduler_none_object_and_numpy_ml_step_id():
    const = get_scheduler(None, lr=0.2)
    assert isinstance(const, ConstantScheduler) and const(5) == 0.2
    with pytest.raises(ValueError):
        get_scheduler(None)
    obj = NoamScheduler()
    assert get_scheduler(obj) is obj
    # numpy-ml writes id "StepScheduler" for its ExponentialScheduler
    sched = get_scheduler({"id": "StepScheduler", "initial_lr": 0.1, "stage_length": 4,
                           "staircase": False, "decay": 0.5})
    assert isinstance(sched, ExponentialScheduler) and sched(4) == pytest.approx(0.05)


@pytest.mark.parametrize("spec", [
    "cosine(lr=0.1)", "constant(lr=0.1", "constant(0.1)", "constant(bogus=1)",
    "constant(lr=__import__('os').getcwd())", "constant(lr=-1)", "constant(lr=nan)",
    "exponential(stage_length=0)", "exponential(staircase=2)", "king(patience=0)",
    "noam(warmup_steps=-5)", "constant(lr=1, lr=2)", "", "1 + 2",
    {"id": "NoSuchScheduler"}, {"lr": 0.1}, {"id": "ConstantScheduler", "initial_lr": 0.1},
])
def test_bad_specs_raise_value_error(spec):
    with pytest.raises(ValueError):
        get_scheduler(spec)


def test_bad_types_and_values():
    with pytest.raises(TypeError):
        get_scheduler(0.1)
    for bad in (float("inf"), float("nan"), -0.1, True, "0.1"):
        with pytest.raises(ValueError):
            ConstantScheduler(lr=bad)
    with pytest.raises(ValueError, match="step"):
        ExponentialScheduler()(None)
    with pytest.raises(ValueError, match="step"):
        NoamScheduler()(-1)


def test_custom_subclass_is_accepted():
    class Halving(SchedulerBase):
        _id = "Halving"

        def learning_rate(self, step=None, cur_loss=None):
            return 1.0 / 2 ** step

    sched = get_scheduler(Halving())
    assert sched(3) == 0.125 and math.isclose(sched(0), 1.0)
