"""Learning-rate schedulers (numpy-ml's names, defaults and formulas).

A scheduler maps the optimizer's step counter (and, for :class:`KingScheduler`, the
current loss) to a learning rate::

    sched = ExponentialScheduler(initial_lr=0.01, stage_length=100)
    lr = sched(step, cur_loss=None)

Optimizers call ``self.lr_scheduler(self.cur_step, cur_loss)`` once per parameter update,
exactly as numpy-ml does (so a :class:`KingScheduler` records the loss once per parameter
per step, as in numpy-ml).

:func:`get_scheduler` builds a scheduler from ``None`` (a constant learning rate), an
object, a dict of hyperparameters with an ``"id"`` (or numpy-ml's
``{"hyperparameters": {...}}`` form), or a string in numpy-ml's ``SchedulerInitializer``
syntax such as ``"exponential(initial_lr=0.01, stage_length=100)"``. Strings are parsed
with :mod:`ast` and their values read with :func:`ast.literal_eval`: nothing is ever
evaluated.

Differences from numpy-ml, all deliberate:

- Unknown scheduler names and unknown arguments raise ``ValueError`` (numpy-ml silently
  swallows unknown keyword arguments), and hyperparameters are validated on construction.
- ``copy()`` returns a fresh scheduler with the same hyperparameters and no history
  (numpy-ml deep-copies, history included); this matches ``Optimizer.copy()``.
- ``ExponentialScheduler.hyperparameters["id"]`` is ``"ExponentialScheduler"``; numpy-ml
  writes ``"StepScheduler"``, which :func:`get_scheduler` also accepts.
- ``NoamScheduler`` at step 0 returns 0.0 (the limit of its formula) instead of raising
  ``ZeroDivisionError``.
- ``KingScheduler`` treats a window of fewer than 3 losses (possible only with
  ``patience < 2``) as "still decreasing" instead of dividing by zero.
"""
import ast
import inspect
import math

import numpy as np

__all__ = ["SchedulerBase", "ConstantScheduler", "ExponentialScheduler", "NoamScheduler",
           "KingScheduler", "get_scheduler", "gaussian_cdf"]


# ------------------------------------------------------------------ validation helpers

def _real(name, value, *, min_value=None, allow_equal=True, max_value=None,
          max_exclusive=False):
    """``value`` as a float, or ValueError naming ``name``; bools are rejected."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if min_value is not None and (v < min_value or (not allow_equal and v == min_value)):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value!r}")
    if max_value is not None and (v > max_value or (max_exclusive and v == max_value)):
        op = "<" if max_exclusive else "<="
        raise ValueError(f"{name} must be {op} {max_value}, got {value!r}")
    return value


def _step_value(step, who):
    if step is None:
        raise ValueError(f"{who} needs the step number, got step=None")
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, float, np.integer,
                                                                    np.floating)):
        raise ValueError(f"step must be a number, got {step!r}")
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"step must be finite and >= 0, got {step!r}")
    return step


def gaussian_cdf(x, mean, var):
    """P(X <= x) for X ~ N(mean, var) (numpy-ml's helper, eps added to the variance)."""
    eps = np.finfo(float).eps
    x_scaled = (x - mean) / math.sqrt(var + eps)
    return (1.0 + math.erf(x_scaled / math.sqrt(2.0))) / 2.0


# ------------------------------------------------------------------ the schedulers

class SchedulerBase:
    """Base class: ``sched(step, cur_loss=None) -> lr``.

    Subclasses list their hyperparameters (constructor arguments, in order) in
    ``_hyperparameter_names`` and implement :meth:`learning_rate`.
    """

    #: Value of ``hyperparameters["id"]``.
    _id = None
    #: Constructor arguments, in signature order.
    _hyperparameter_names = ()

    def __call__(self, step=None, cur_loss=None):
        return self.learning_rate(step=step, cur_loss=cur_loss)

    def learning_rate(self, step=None, cur_loss=None):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def hyperparameters(self):
        """``{"id": <class name>, <argument>: <value>, ...}``: a fresh dict on every access."""
        hp = {"id": self._id}
        hp.update((k, getattr(self, k)) for k in self._hyperparameter_names)
        return hp

    def copy(self):
        """A fresh scheduler with the same hyperparameters and no history."""
        return type(self)(**{k: getattr(self, k) for k in self._hyperparameter_names})

    def reset(self):
        """Forget any history (a no-op for stateless schedulers)."""

    def state_dict(self):
        """Mutable state as a flat dict of numbers/arrays (empty for stateless schedulers)."""
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def __str__(self):
        args = ", ".join(f"{k}={getattr(self, k)}" for k in self._hyperparameter_names)
        return f"{type(self).__name__}({args})"

    __repr__ = __str__

    def __eq__(self, other):
        return type(self) is type(other) and self.hyperparameters == other.hyperparameters

    __hash__ = None


class ConstantScheduler(SchedulerBase):
    """A fixed learning rate, whatever the step.

    Parameters
    ----------
    lr : float
        The learning rate (finite, >= 0). Default 0.01.
    """

    _id = "ConstantScheduler"
    _hyperparameter_names = ("lr",)

    def __init__(self, lr=0.01):
        self.lr = _real("lr", lr, min_value=0.0)

    def learning_rate(self, step=None, cur_loss=None):
        return self.lr


class ExponentialScheduler(SchedulerBase):
    """Exponential decay by ``decay`` every ``stage_length`` steps.

    .. math::

        lr = initial\\_lr \\cdot decay^{stage}, \\qquad
        stage = step / stage\\_length \\;(\\text{or } \\lfloor step / stage\\_length \\rfloor
        \\text{ with } staircase)

    Parameters
    ----------
    initial_lr : float
        The learning rate at step 0. Default 0.01.
    stage_length : int
        Steps per stage (> 0). Default 500.
    staircase : bool
        If True the rate changes only at stage boundaries (a step function); if False it
        decays smoothly every step. Default False.
    decay : float
        Factor applied per stage (>= 0). Default 0.1.
    """

    _id = "ExponentialScheduler"
    _hyperparameter_names = ("initial_lr", "stage_length", "staircase", "decay")

    def __init__(self, initial_lr=0.01, stage_length=500, staircase=False, decay=0.1):
        self.initial_lr = _real("initial_lr", initial_lr, min_value=0.0)
        self.stage_length = _real("stage_length", stage_length, min_value=0.0, allow_equal=False)
        if not isinstance(staircase, (bool, np.bool_)):
            raise ValueError(f"staircase must be True or False, got {staircase!r}")
        self.staircase = bool(staircase)
        self.decay = _real("decay", decay, min_value=0.0)

    def learning_rate(self, step=None, cur_loss=None):
        step = _step_value(step, "ExponentialScheduler")
        cur_stage = step / self.stage_length
        if self.staircase:
            cur_stage = math.floor(cur_stage)
        return self.initial_lr * self.decay ** cur_stage


class NoamScheduler(SchedulerBase):
    """The Noam schedule of Vaswani et al. (2017): linear warm-up, then ``step**-0.5`` decay.

    .. math::

        lr = scale\\_factor \\cdot model\\_dim^{-1/2}
             \\min(step^{-1/2},\\; step \\cdot warmup\\_steps^{-3/2})

    Step 0 gives 0.0 (the limit of the formula; numpy-ml raises ZeroDivisionError).

    Parameters
    ----------
    model_dim : int
        Units in the layer output (> 0). Default 512.
    scale_factor : float
        Fixed multiplier of the rate (>= 0). Default 1.
    warmup_steps : int
        Length of the warm-up (> 0). Default 4000.
    """

    _id = "NoamScheduler"
    _hyperparameter_names = ("model_dim", "scale_factor", "warmup_steps")

    def __init__(self, model_dim=512, scale_factor=1, warmup_steps=4000):
        self.model_dim = _real("model_dim", model_dim, min_value=0.0, allow_equal=False)
        self.scale_factor = _real("scale_factor", scale_factor, min_value=0.0)
        self.warmup_steps = _real("warmup_steps", warmup_steps, min_value=0.0, allow_equal=False)

    def learning_rate(self, step=None, cur_loss=None):
        step = _step_value(step, "NoamScheduler")
        if step == 0:
            return 0.0 * self.scale_factor
        new_lr = self.model_dim ** (-0.5) * min(step ** (-0.5), step * self.warmup_steps ** (-1.5))
        return self.scale_factor * new_lr


class KingScheduler(SchedulerBase):
    """Davis King's (dlib) schedule: decay when the loss has stopped decreasing.

    Each call appends ``cur_loss`` to a history of at most
    ``max_history = ceil(1.1 * (patience + 1))`` losses. Once ``patience`` losses are
    recorded, an OLS line is fitted to the last ``patience + 1`` of them; when the
    probability that its slope is negative, ``P(slope < 0)``, is below 0.51, both on the
    raw history and on the history without its largest 10% (robust to loss spikes), the
    rate is multiplied by ``decay``. The slope's variance is estimated as
    ``12 * s2 / (N**3 - N)`` with ``s2`` the residual variance.

    Parameters
    ----------
    initial_lr : float
        Starting learning rate. Default 0.01.
    patience : int
        Steps without a decrease in loss before the rate is decayed (>= 1). Default 1000.
    decay : float
        Multiplier applied at each decay (>= 0). Default 0.99.

    Notes
    -----
    Calling the scheduler requires ``cur_loss`` (ValueError otherwise) and mutates its
    history; :meth:`state_dict` / :meth:`load_state_dict` save and restore it.
    """

    _id = "KingScheduler"
    _hyperparameter_names = ("initial_lr", "patience", "decay")

    def __init__(self, initial_lr=0.01, patience=1000, decay=0.99):
        self.initial_lr = _real("initial_lr", initial_lr, min_value=0.0)
        if (isinstance(patience, (bool, np.bool_)) or not isinstance(patience, (int, np.integer))
                or patience < 1):
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.patience = int(patience)
        self.decay = _real("decay", decay, min_value=0.0)
        self.max_history = int(math.ceil(1.1 * (self.patience + 1)))
        self.reset()

    def reset(self):
        self.current_lr = self.initial_lr
        self.loss_history = []

    def state_dict(self):
        return {"current_lr": float(self.current_lr),
                "loss_history": np.asarray(self.loss_history, dtype=np.float64)}

    def load_state_dict(self, state):
        extra = set(state) - {"current_lr", "loss_history"}
        if extra:
            raise ValueError(f"unknown KingScheduler state keys {sorted(extra)}")
        current_lr = float(state.get("current_lr", self.initial_lr))
        history = [float(v) for v in np.asarray(state.get("loss_history", []),
                                                dtype=np.float64).reshape(-1)]
        self.current_lr, self.loss_history = current_lr, history

    @staticmethod
    def _p_decreasing(loss_history, i):
        """P(slope < 0) of the OLS line through ``loss_history[i:]`` at x = i, i+1, ...

        The closed form below (centred x) is the same estimator as numpy-ml's normal
        equations ``inv(X.T @ X) @ X.T @ y``, without forming the inverse.
        """
        loss = loss_history[i:]
        n = len(loss)
        if n < 3:  # no residual degrees of freedom: no evidence that the loss stalled
            return 1.0
        x = np.arange(i, len(loss_history), dtype=np.float64)
        x_c = x - x.mean()
        s_mean = float(np.dot(x_c, loss - loss.mean()) / np.dot(x_c, x_c))
        intercept = float(loss.mean() - s_mean * x.mean())
        loss_pred = s_mean * x + intercept
        loss_var = float(np.sum((loss - loss_pred) ** 2)) / (n - 2)
        s_var = (12.0 * loss_var) / (n ** 3 - n)
        return gaussian_cdf(0.0, s_mean, s_var)

    def _steps_without_decrease(self, robust=False):
        lh = np.asarray(self.loss_history, dtype=np.float64)
        if robust:  # drop the largest 10% of losses (transient spikes)
            lh = lh[lh <= np.quantile(lh, 0.9)]
        n = len(lh)
        i = max(0, n - self.patience - 1)
        return n - i if self._p_decreasing(lh, i) < 0.51 else 0

    def learning_rate(self, step=None, cur_loss=None):
        if cur_loss is None:
            raise ValueError("KingScheduler needs cur_loss (a float), got None")
        cur_loss = float(cur_loss)
        if not math.isfinite(cur_loss):
            # a NaN in the history makes every later slope test false: the rate would never
            # decay again, without a word (the history is left as it was)
            raise ValueError(f"KingScheduler needs a finite cur_loss, got {cur_loss}")
        self.loss_history.append(cur_loss)
        if len(self.loss_history) < self.patience:
            return self.current_lr
        self.loss_history = self.loss_history[-self.max_history:]
        if (self._steps_without_decrease() > self.patience
                and self._steps_without_decrease(robust=True) > self.patience):
            self.current_lr *= self.decay
        return self.current_lr


# ------------------------------------------------------------------ parsing

_TRUE_FALSE_NONE = {"true": True, "false": False, "none": None}


def _literal(node, text):
    """The value of an AST node holding a literal (numbers, strings, True/False/None)."""
    if isinstance(node, ast.Name) and node.id.lower() in _TRUE_FALSE_NONE:
        return _TRUE_FALSE_NONE[node.id.lower()]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"cannot read the value {ast.unparse(node)!r} in {text!r}: "
                         "expected a number, a quoted string, True, False or None") from None


def parse_spec(text, what, nested=()):
    """Parse ``"name(key=value, ...)"`` (or a bare ``"name"``) into ``(name, kwargs)``.

    ``name`` is lower-cased. Values must be literals (read with :func:`ast.literal_eval`;
    ``true``/``false``/``none`` in any case are accepted, since numpy-ml lower-cases its
    strings), except for keys in ``nested``, whose value may itself be a call such as
    ``lr_scheduler=exponential(decay=0.5)``; that value is returned as its source text.
    ``what`` names the kind of spec in error messages.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} spec must be a string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"cannot parse {what} spec {text!r}: expected e.g. "
                         f"'name(key=value, ...)' ({type(exc).__name__})") from None
    if isinstance(tree, ast.Name):
        return tree.id.lower(), {}
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise ValueError(f"cannot parse {what} spec {text!r}: expected 'name' or "
                         "'name(key=value, ...)'")
    if tree.args:
        raise ValueError(f"{what} spec {text!r}: pass arguments by keyword (key=value)")
    kwargs = {}
    for kw in tree.keywords:
        if kw.arg is None:
            raise ValueError(f"{what} spec {text!r}: '**' is not allowed")
        key = kw.arg.lower()
        if key in kwargs:
            raise ValueError(f"{what} spec {text!r}: argument {key!r} given twice")
        if key in nested and isinstance(kw.value, (ast.Call, ast.Name)) and not (
                isinstance(kw.value, ast.Name) and kw.value.id.lower() in _TRUE_FALSE_NONE):
            kwargs[key] = ast.unparse(kw.value)
        else:
            kwargs[key] = _literal(kw.value, text)
    return tree.func.id.lower(), kwargs


def build(cls, kwargs, what):
    """``cls(**kwargs)`` with unknown arguments reported as ValueError."""
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for {what} "
                         f"{cls.__name__}; it accepts {', '.join(allowed)}")
    return cls(**kwargs)


_SCHEDULERS = {
    "constant": ConstantScheduler,
    "exponential": ExponentialScheduler,
    "step": ExponentialScheduler,  # numpy-ml writes id "StepScheduler" for it
    "noam": NoamScheduler,
    "king": KingScheduler,
}


def _scheduler_class(name):
    key = str(name).lower()
    if key.endswith("scheduler"):
        key = key[: -len("scheduler")]
    try:
        return _SCHEDULERS[key]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}: expected one of constant, exponential, "
                         "noam, king (or their class names, e.g. 'ExponentialScheduler')"
                         ) from None


def get_scheduler(spec, lr=None):
    """Build a learning-rate scheduler (numpy-ml's ``SchedulerInitializer``).

    Parameters
    ----------
    spec : None, SchedulerBase, dict or str
        - ``None``: ``ConstantScheduler(lr)`` (``lr`` must then be given);
        - a scheduler object: returned as is (not copied, as in numpy-ml);
        - a dict: ``{"id": "ExponentialScheduler", "initial_lr": 0.01, ...}``, or numpy-ml's
          ``{"hyperparameters": {"id": ..., ...}}``; ids are matched case-insensitively,
          with or without the ``Scheduler`` suffix;
        - a string: ``"constant(lr=0.1)"``, ``"exponential(initial_lr=0.01,
          stage_length=100)"``, ``"noam(warmup_steps=100)"``, ``"king"``, or the ``str()``
          of a scheduler (``"ConstantScheduler(lr=0.1)"``).
    lr : float, optional
        The constant rate used when ``spec`` is None.

    Raises
    ------
    ValueError
        Unknown scheduler name, unknown argument, unparsable string or bad value.
    TypeError
        ``spec`` of another type.
    """
    if spec is None:
        if lr is None:
            raise ValueError("get_scheduler: spec and lr cannot both be None")
        return ConstantScheduler(lr=lr)
    if isinstance(spec, SchedulerBase):
        return spec
    if isinstance(spec, dict):
        hp = spec["hyperparameters"] if "hyperparameters" in spec else spec
        if not isinstance(hp, dict) or "id" not in hp:
            raise ValueError(f"scheduler dict needs an 'id' key, got {spec!r}")
        kwargs = {k: v for k, v in hp.items() if k != "id"}
        return build(_scheduler_class(hp["id"]), kwargs, "scheduler")
    if isinstance(spec, str):
        name, kwargs = parse_spec(spec, "scheduler")
        return build(_scheduler_class(name), kwargs, "scheduler")
    raise TypeError(f"cannot build a scheduler from {type(spec).__name__}: expected None, a "
                    "scheduler, a dict or a string")
