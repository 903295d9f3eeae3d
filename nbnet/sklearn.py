"""scikit-learn estimators backed by nbnet: :class:`MLPClassifier`, :class:`MLPRegressor`.

Requires scikit-learn (``pip install 'nbnet[sklearn]'``); the rest of nbnet does not.
Both follow scikit-learn's estimator contract (``get_params``/``set_params`` from
``BaseEstimator``, input validation, ``n_features_in_``, ``classes_``) and pass
``sklearn.utils.estimator_checks`` (see ``tests/test_sklearn.py``).

The network: ``hidden_layer_sizes`` fully connected layers, each followed by the
activation (fused into the layer, or into the normalization layer when ``norm`` is
"batch"/"layer"), then an output layer; cross-entropy from logits for the classifier,
squared error for the regressor (whose targets are standardised internally). Defaults
follow scikit-learn's MLPs where they have a counterpart (100 hidden units, ReLU, Adam
with learning rate 1e-3, batch size min(200, n), 200 epochs).
"""
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .layers import BatchNorm1D, FullyConnected, LayerNorm1D
from .model import Model


class _BaseMLP(BaseEstimator):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", norm=None, optimizer="adam",
                 learning_rate_init=1e-3, batch_size="auto", max_iter=200, shuffle=True,
                 random_state=None, dtype="float64", verbose=0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.norm = norm
        self.optimizer = optimizer
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.dtype = dtype
        self.verbose = verbose

    def _check_hyperparameters(self):
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if isinstance(sizes, (int, np.integer)) else list(sizes)
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}")
        if self.norm not in (None, "none", "batch", "layer"):
            raise ValueError(f"norm must be None, 'batch' or 'layer', got {self.norm!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.learning_rate_init, (int, float)) and self.learning_rate_init > 0):
            raise ValueError(f"learning_rate_init must be > 0, got {self.learning_rate_init!r}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, (int, np.integer))
                                              and self.batch_size >= 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got {self.batch_size!r}")
        if np.dtype(self.dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        return [int(s) for s in sizes]

    def _build(self, n_in, n_out, loss, seed):
        sizes = self._check_hyperparameters()
        norm = None if self.norm == "none" else self.norm
        layers = []
        for h in sizes:
            if norm is None:
                layers.append(FullyConnected(h, act_fn=self.activation))
            else:
                layers.append(FullyConnected(h))
                layers.append((BatchNorm1D if norm == "batch" else LayerNorm1D)(act_fn=self.activation))
        layers.append(FullyConnected(n_out))
        return Model(layers, loss=loss, optimizer=f"{self.optimizer}(lr={float(self.learning_rate_init)!r})",
                     input_dim=n_in, dtype=self.dtype, seed=seed)

    def _fit_model(self, X, y, n_out, loss):
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self.model_ = self._build(X.shape[1], n_out, loss, seed)
        n = X.shape[0]
        batch = min(200, n) if self.batch_size == "auto" else min(int(self.batch_size), n)
        if self.norm == "batch" and n < 2:
            raise ValueError("norm='batch' needs at least 2 samples to fit")
        history = self.model_.fit(X, y, epochs=int(self.max_iter), batch_size=batch, shuffle=self.shuffle,
                                  verbose=2 if self.verbose else 0)
        self.loss_curve_ = list(history["loss"])
        self.loss_ = self.loss_curve_[-1]
        self.n_iter_ = len(self.loss_curve_)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier trained by nbnet (softmax cross-entropy).

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (100,)
    activation : str, default "relu"
        Any :mod:`nbnet.activations` spec ("relu", "tanh", "gelu", "leaky_relu(alpha=0.1)", ...).
    norm : {None, "batch", "layer"}, default None
        Insert BatchNorm1D/LayerNorm1D after each hidden layer (activation fused into it).
    optimizer : {"adam", "sgd", "rmsprop", "adagrad"}, default "adam"
    learning_rate_init : float, default 1e-3
    batch_size : int or "auto", default "auto" (min(200, n_samples))
    max_iter : int, default 200
        Epochs.
    shuffle : bool, default True
    random_state : int, RandomState or None
        Seeds initialisation and shuffling.
    dtype : {"float64", "float32"}, default "float64"
    verbose : int, default 0

    Attributes
    ----------
    classes_, n_features_in_, model_ (the :class:`nbnet.Model`), loss_curve_, loss_, n_iter_
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        n_out = max(2, len(self.classes_))  # a single class still trains a 2-logit model
        X = X.astype(self.dtype, copy=False)
        return self._fit_model(X, y_idx, n_out, "cross_entropy")

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        proba = self.model_.predict_proba(X.astype(self.dtype, copy=False)).astype(np.float64)
        return proba[:, :len(self.classes_)] if len(self.classes_) > 1 else np.ones((X.shape[0], 1))

    def predict_log_proba(self, X):
        return np.log(self.predict_proba(X))

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multi-layer perceptron regressor trained by nbnet (squared error).

    Same parameters as :class:`MLPClassifier`. Targets are standardised (per output) for
    training and predictions mapped back, so the learning rate does not depend on the
    targets' scale.

    Attributes
    ----------
    n_features_in_, n_outputs_, model_, loss_curve_, loss_, n_iter_
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        Y = y.reshape(len(y), -1)
        self.n_outputs_ = Y.shape[1]
        self._y_mean = Y.mean(axis=0)
        std = Y.std(axis=0)
        self._y_std = np.where(std > 0, std, 1.0)
        X = X.astype(self.dtype, copy=False)
        return self._fit_model(X, ((Y - self._y_mean) / self._y_std).astype(self.dtype), Y.shape[1],
                               "squared_error")

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        out = self.model_.predict(X.astype(self.dtype, copy=False)).astype(np.float64)
        out = out * self._y_std + self._y_mean
        return out.ravel() if self._y_1d else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def expected_failed_checks(estimator):
    """Checks of ``sklearn.utils.estimator_checks`` this estimator is known to fail, with
    reasons (for ``parametrize_with_checks(..., expected_failed_checks=...)``)."""
    return {}


__all__ = ["MLPClassifier", "MLPRegressor", "expected_failed_checks"]
