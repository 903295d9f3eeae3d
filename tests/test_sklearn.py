"""nbnet.sklearn estimators against scikit-learn's estimator checks."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import estimator_checks_generator  # noqa: E402

from nbnet.sklearn import MLPClassifier, MLPRegressor, expected_failed_checks  # noqa: E402

# Small networks keep the ~50 checks per estimator fast; the checks' own data are small.
ESTIMATORS = [MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, random_state=0),
              MLPRegressor(hidden_layer_sizes=(32,), max_iter=100, random_state=0)]

# Checks that do not apply: the estimators take NumPy arrays only and declare no
# array-API support, so scikit-learn would only report these as skipped.
NOT_APPLICABLE = {"check_array_api_input"}


def _check_name(check):
    return getattr(check, "func", check).__name__


CHECKS = [pytest.param(est, check, id=f"{type(est).__name__}-{_check_name(check)}")
          for est in ESTIMATORS
          for est, check in estimator_checks_generator(est, legacy=True,
                                                       expected_failed_checks=expected_failed_checks(est))
          if _check_name(check) not in NOT_APPLICABLE]


@pytest.mark.parametrize("estimator, check", CHECKS)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_classifier_learns_digits_subset():
    from nbnet.data import load_digits
    X, y = load_digits()
    X = X.astype(np.float64) / 16.0
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=0, norm="batch")
    clf.fit(X[:1200], y[:1200])
    assert clf.score(X[1200:], y[1200:]) > 0.9
    proba = clf.predict_proba(X[1200:1210])
    assert proba.shape == (10, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert clf.get_params()["norm"] == "batch"
    clf.set_params(max_iter=5)
    assert clf.max_iter == 5


def test_regressor_fits_linear_target():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = 3.0 * X[:, 0] - 2.0 * X[:, 1] + 100.0
    reg = MLPRegressor(hidden_layer_sizes=(32,), max_iter=150, random_state=0, learning_rate_init=1e-2)
    reg.fit(X, y)
    assert reg.score(X, y) > 0.95
    assert reg.predict(X).shape == (400,)


def test_string_labels_and_clear_errors():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3))
    y = np.where(X[:, 0] > 0, "pos", "neg")
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, y)
    assert set(clf.predict(X)) <= {"pos", "neg"}
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        MLPClassifier(hidden_layer_sizes=(0,)).fit(X, y)
    with pytest.raises(ValueError, match="norm"):
        MLPClassifier(norm="group").fit(X, y)
