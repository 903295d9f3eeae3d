"""Activation functions as compiled-kernel codes, with numpy-ml's names and string syntax.

Normalization and dense layers apply an activation to their output (``act_fn=``), fused
into their kernel passes (the piecewise-linear ones; on CUDA, all of them) or, on CPU for
the smooth ones, as the activation layers' own vectorised pass; every activation is
described once here: a name, an integer code that kernels branch on, and one float
parameter.

Accepted spellings (case and ``_``/space insensitive), numpy-ml's first:

=================================  =====  ======================================
string                             code   function
=================================  =====  ======================================
``None``, ``"identity"``            0      ``z``
``"relu"``                          1      ``max(z, 0)``
``"leaky relu(alpha=0.3)"``         2      ``z if z > 0 else alpha * z`` (alpha 0.3)
``"elu(alpha=1.0)"``                3      ``z if z > 0 else alpha * (exp(z) - 1)``
``"gelu(approximate=False)"``       4      ``z * Phi(z)`` (exact, erf)
``"gelu"``/``"gelu(approximate=True)"`` 5  tanh approximation (numpy-ml's default)
``"tanh"``                          6      ``tanh(z)``
``"sigmoid"``                       7      ``1 / (1 + exp(-z))``
=================================  =====  ======================================
"""
import re
from dataclasses import dataclass

IDENTITY, RELU, LEAKY_RELU, ELU, GELU_EXACT, GELU_TANH, TANH, SIGMOID = range(8)


@dataclass(frozen=True)
class Activation:
    """A parsed activation: ``code`` for the kernels, ``alpha`` its one parameter."""

    code: int
    alpha: float = 0.0

    @property
    def name(self):
        return _NAMES[self.code](self.alpha)

    @property
    def piecewise_linear(self):
        """True for identity, ReLU and leaky ReLU: selects, which the CPU kernels of other
        layers fuse into their own passes at no cost. The smooth activations (ELU, GELU,
        tanh, sigmoid) run as a pass of their own on CPU (see :mod:`nbnet.layers.activation`)."""
        return self.code <= LEAKY_RELU

    def __str__(self):
        return self.name


_NAMES = {
    IDENTITY: lambda a: "Identity",
    RELU: lambda a: "ReLU",
    LEAKY_RELU: lambda a: f"Leaky ReLU(alpha={a!r})",
    ELU: lambda a: f"ELU(alpha={a!r})",
    GELU_EXACT: lambda a: "GELU(approximate=False)",
    GELU_TANH: lambda a: "GELU(approximate=True)",
    TANH: lambda a: "Tanh",
    SIGMOID: lambda a: "Sigmoid",
}

_PATTERN = re.compile(r"^\s*([a-z_ ]+?)\s*(?:\((.*)\))?\s*$")


def _kwargs(text, spec):
    out = {}
    if not text or not text.strip():
        return out
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"cannot parse activation {spec!r}: expected key=value inside ()")
        key, val = (s.strip() for s in part.split("=", 1))
        out[key] = val
    return out


def parse_activation(spec):
    """Parse ``spec`` (None, a string, or an :class:`Activation`) into an Activation.

    Raises ``ValueError`` naming the accepted activations for anything else.
    """
    if spec is None:
        return Activation(IDENTITY)
    if isinstance(spec, Activation):
        return spec
    if hasattr(spec, "activation") and isinstance(spec.activation, Activation):
        return spec.activation  # an activation layer object
    if not isinstance(spec, str):
        raise TypeError(f"act_fn must be None, a string or an Activation, got {type(spec).__name__}")
    m = _PATTERN.match(spec.lower())
    if not m:
        raise ValueError(f"cannot parse activation {spec!r}")
    name = m.group(1).replace("_", " ").strip()
    kw = _kwargs(m.group(2), spec)

    def num(key, default):
        if key not in kw:
            return default
        try:
            return float(kw.pop(key))
        except ValueError:
            raise ValueError(f"activation {spec!r}: {key} must be a number") from None

    if name in ("identity", "linear", "none"):
        act = Activation(IDENTITY)
    elif name == "relu":
        act = Activation(RELU)
    elif name in ("leaky relu", "leakyrelu"):
        act = Activation(LEAKY_RELU, num("alpha", 0.3))
    elif name == "elu":
        act = Activation(ELU, num("alpha", 1.0))
    elif name == "gelu":
        approx = kw.pop("approximate", "true").lower()
        if approx not in ("true", "false", "tanh", "none"):
            raise ValueError(f"activation {spec!r}: approximate must be True or False")
        act = Activation(GELU_TANH if approx in ("true", "tanh") else GELU_EXACT)
    elif name == "tanh":
        act = Activation(TANH)
    elif name == "sigmoid":
        act = Activation(SIGMOID)
    else:
        raise ValueError(f"unknown activation {spec!r}: expected None, 'identity', 'relu', "
                         "'leaky_relu(alpha=...)', 'elu(alpha=...)', 'gelu', "
                         "'gelu(approximate=False)', 'tanh' or 'sigmoid'")
    if kw:
        raise ValueError(f"activation {spec!r}: unexpected argument(s) {', '.join(kw)}")
    return act
