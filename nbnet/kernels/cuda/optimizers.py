"""CUDA twins of :mod:`nbnet.kernels.cpu.optimizers`: same names, same arguments.

Updates are elementwise (one thread per element, float64 arithmetic, one rounding per
store), so they match the CPU bits up to FMA contraction. The CPU ``block`` argument is
accepted and ignored (the CUDA block is ``config.CUDA_BLOCK``). :func:`sum_of_squares`
honours the caller's ``chunk``: one CUDA block per chunk writes ``partial[k]`` (a tree
sum), and a one-block second launch adds the partials (fixed lane order + tree), so the
clip norm is deterministic.
"""
import math

from ._common import launch, MAX_THREADS, F64, block_size, block_sum, cuda, n_blocks


@cuda.jit
def _chunk_squares(x, chunk, partial):
    n = x.shape[0]
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    buf = cuda.shared.array(MAX_THREADS, F64)
    start = k * chunk
    stop = min(start + chunk, n)
    s = 0.0
    for i in range(start + t, stop, B):
        v = F64(x[i])
        s += v * v
    s = block_sum(buf, s, t, B)
    if t == 0:
        partial[k] = s


@cuda.jit
def _sum_partials(partial, out):
    t = cuda.threadIdx.x
    B = cuda.blockDim.x
    buf = cuda.shared.array(MAX_THREADS, F64)
    s = 0.0
    for k in range(t, partial.shape[0], B):
        s += partial[k]
    s = block_sum(buf, s, t, B)
    if t == 0:
        out[0] = s


def sum_of_squares(size, x, chunk, partial, out):
    B = block_size()
    if partial.shape[0] > 0:
        launch(_chunk_squares, partial.shape[0], B, x, int(chunk), partial)
    launch(_sum_partials, 1, B, partial, out)


@cuda.jit
def _sgd(param, grad, cache, lr, momentum, scale):
    i = cuda.grid(1)
    if i < param.shape[0]:
        u = momentum * F64(cache[i]) + lr * (scale * F64(grad[i]))
        cache[i] = u
        param[i] = F64(param[i]) - u


@cuda.jit
def _adagrad(param, grad, cache, lr, eps, scale):
    i = cuda.grid(1)
    if i < param.shape[0]:
        g = scale * F64(grad[i])
        cache[i] = F64(cache[i]) + g * g
        c = F64(cache[i])
        param[i] = F64(param[i]) - lr * g / (math.sqrt(c) + eps)


@cuda.jit
def _rmsprop(param, grad, cache, lr, decay, eps, scale):
    i = cuda.grid(1)
    if i < param.shape[0]:
        g = scale * F64(grad[i])
        cache[i] = decay * F64(cache[i]) + (1.0 - decay) * (g * g)
        c = F64(cache[i])
        param[i] = F64(param[i]) - lr * g / (math.sqrt(c) + eps)


@cuda.jit
def _adam(param, grad, mean, var, lr, decay1, decay2, eps, bias1, bias2, scale):
    i = cuda.grid(1)
    if i < param.shape[0]:
        g = scale * F64(grad[i])
        mean[i] = decay1 * F64(mean[i]) + (1.0 - decay1) * g
        var[i] = decay2 * F64(var[i]) + (1.0 - decay2) * (g * g)
        m_hat = F64(mean[i]) / bias1
        v_hat = F64(var[i]) / bias2
        param[i] = F64(param[i]) - lr * m_hat / (math.sqrt(v_hat) + eps)


def _launch(kern, param, *args):
    n = param.shape[0]
    if n:
        B = block_size()
        launch(kern, n_blocks(n, B), B, param, *args)


def sgd_update(size, param, grad, cache, lr, momentum, scale, block):
    _launch(_sgd, param, grad, cache, float(lr), float(momentum), float(scale))


def adagrad_update(size, param, grad, cache, lr, eps, scale, block):
    _launch(_adagrad, param, grad, cache, float(lr), float(eps), float(scale))


def rmsprop_update(size, param, grad, cache, lr, decay, eps, scale, block):
    _launch(_rmsprop, param, grad, cache, float(lr), float(decay), float(eps), float(scale))


def adam_update(size, param, grad, mean, var, lr, decay1, decay2, eps, bias1, bias2, scale, block):
    _launch(_adam, param, grad, mean, var, float(lr), float(decay1), float(decay2), float(eps),
            float(bias1), float(bias2), float(scale))


KERNELS = {
    "sum_of_squares": sum_of_squares,
    "sgd_update": sgd_update,
    "adagrad_update": adagrad_update,
    "rmsprop_update": rmsprop_update,
    "adam_update": adam_update,
}
