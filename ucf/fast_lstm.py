"""The LSTM's fast numerics, behind a small interface: LSTMLayer (one LSTM layer over a whole chunk of steps
as one Chainer function, F.lstm's arithmetic and gate layout), ExpSigmoid (F.sigmoid by one exp on the CPU) and
LeanAdam (Chainer's Adam step, bit-identical, in cache-sized blocks on the job's CPUs). rnn.py builds its model and
optimiser from them; tests/test_rnn.py checks them against F.lstm and Chainer's Adam."""
import threading

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import numpy as np

from ucf.runcontrol import usable_cpus


class LSTMLayer(chainer.FunctionNode):
    """One LSTM layer over a whole chunk of steps as one function: the input projection of every step (one
    matrix product), then the recurrence with F.lstm's arithmetic step by step, without a graph node per step.
    The weights are Chainer's, in F.lstm's gate layout (a saved model means the same as with L.LSTM).

    Inputs: the chunk's inputs time-major (steps, batch, n_in), the input weight (4 hidden, n_in) and bias
    (4 hidden), the lateral weight (4 hidden, hidden), and the carried cell and output states (batch, hidden).
    Outputs: every step's output (steps, batch, hidden) and the final cell and output states.

    Inside, the gates are one block per gate (contiguous slices): the weights' rows are reordered, not the chunk's
    gates. On the CPU each step's four activations come from one exp over its (batch, 4 hidden) gates:
    sigmoid(z) = 1 / (1 + exp(-z)) and tanh(z) = 2 sigmoid(2z) - 1, with the factors -1 and -2 folded into the
    reordered weights (exact: powers of two). numpy's float32 exp costs a third of its tanh, which F.lstm uses for
    all of them. The results agree with F.lstm to float32 rounding (tested). The gradient needs no transcendental
    function; each weight's gradient is one matrix product over all steps, and the input's is computed only when
    asked for (a first layer's input is data).
    """

    # On the CPU a step's activations come from one exp; False runs the GPU's arithmetic there (for the tests).
    BY_EXP = True

    def __init__(self, projected=False):
        super().__init__()
        self.projected = projected

    @classmethod
    def by_exp(cls, xp):
        return cls.BY_EXP and xp is np

    @classmethod
    def project(cls, x, w_in, b, out=None):
        """The input projection of rows x (N, n_in): (N, 4 hidden) in the layout the steps start from (gate-major,
        and on the CPU with the factors of EXP_SCALE)."""
        xp = chainer.backend.get_array_module(x)
        scale = EXP_SCALE if cls.by_exp(xp) else None
        out = xp.matmul(x, gate_major_rows(w_in, scale).T, out=out)
        out += gate_major(b, scale)
        return out

    def forward(self, inputs):
        """Inputs (x, w_in, b, w_lateral, c0, h0); with projected=True (inference only), (gates, w_lateral, c0,
        h0) instead, the gates time-major from project() (consumed: the steps overwrite them)."""
        if self.projected:
            gates, w_lateral, c0, h0 = inputs
            xp = chainer.backend.get_array_module(gates)
        else:
            x, w_in, b, w_lateral, c0, h0 = inputs
            xp = chainer.backend.get_array_module(x)
            steps, batch, n_in = x.shape
            n = w_lateral.shape[1]
            # Each step's input beside its previous output, (steps x batch, n_in + hidden): the backward pass gets
            # both weights' gradients from one matrix product (the outputs are copied in then).
            self.inputs_and_outputs = xp.empty((steps * batch, n_in + n), np.float32)
            x_flat = self.inputs_and_outputs[:, :n_in]
            x_flat.reshape(steps, batch, n_in)[...] = x
            self.w_in, self.w_lateral = w_in, w_lateral
            gates = xp.empty((steps, batch, 4 * n), np.float32)  # the activated gates of every step end up in it
            self.project(x_flat, w_in, b, out=gates.reshape(steps * batch, -1))
        steps, batch, width = gates.shape
        n = width // 4
        self.h = xp.empty((steps + 1, batch, n), np.float32)
        self.c = xp.empty((steps + 1, batch, n), np.float32)
        self.tanh_c = xp.empty((steps, batch, n), np.float32)
        self.h[0], self.c[0] = h0, c0
        if self.by_exp(xp):
            self._steps_by_exp(gates, gate_major_rows(w_lateral, EXP_SCALE).T)
        else:
            self._steps(gates, gate_major_rows(w_lateral).T, xp)
        self.gates = gates
        return self.h[1:], self.c[steps], self.h[steps]

    def _steps_by_exp(self, gates, lateral):
        n = lateral.shape[0]
        product = np.empty(gates.shape[1:], np.float32)
        fc = np.empty((gates.shape[1], n), np.float32)
        with np.errstate(over='ignore'):  # exp(large) = inf gives the exact limits 0 and -1
            for t, g in enumerate(gates):
                np.matmul(self.h[t], lateral, out=product)
                g += product
                np.exp(g, out=g)
                g += 1
                np.reciprocal(g, out=g)  # sigmoid of i, f and o; sigmoid(2z) for a
                a, i, f, o = g[:, :n], g[:, n:2 * n], g[:, 2 * n:3 * n], g[:, 3 * n:]
                a *= 2
                a -= 1
                c = self.c[t + 1]
                np.multiply(a, i, out=c)
                np.multiply(f, self.c[t], out=fc)
                c += fc
                tanh_c = self.tanh_c[t]
                np.multiply(c, -2, out=tanh_c)
                np.exp(tanh_c, out=tanh_c)
                tanh_c += 1
                np.divide(2, tanh_c, out=tanh_c)
                tanh_c -= 1
                np.multiply(o, tanh_c, out=self.h[t + 1])

    def _steps(self, gates, lateral, xp):
        """The same steps with the library's tanh (on a GPU, where the folding saves nothing)."""
        n = lateral.shape[0]
        for t, g in enumerate(gates):
            g += self.h[t] @ lateral
            xp.tanh(g[:, :n], out=g[:, :n])
            g[:, n:] = xp.tanh(g[:, n:] * 0.5) * 0.5 + 0.5
            a, i, f, o = g[:, :n], g[:, n:2 * n], g[:, 2 * n:3 * n], g[:, 3 * n:]
            self.c[t + 1] = a * i + f * self.c[t]
            self.tanh_c[t] = xp.tanh(self.c[t + 1])
            self.h[t + 1] = o * self.tanh_c[t]

    def backward(self, indexes, grad_outputs):
        if self.projected:
            raise RuntimeError('LSTMLayer(projected=True) is for inference only')
        w_in, w_lateral, gates, tanh_c = self.w_in, self.w_lateral, self.gates, self.tanh_c
        xp = chainer.backend.get_array_module(gates)
        grad_seq, grad_c, grad_h = (None if g is None else g.array for g in grad_outputs)
        steps, batch, n = tanh_c.shape
        n_in = w_in.shape[1]
        weight = gate_major_rows(w_lateral)
        dh = xp.zeros((batch, n), np.float32) if grad_h is None else grad_h.copy()
        dc = xp.zeros((batch, n), np.float32) if grad_c is None else grad_c.copy()
        work, slope = xp.empty((batch, n), np.float32), xp.empty((batch, n), np.float32)
        d_gates = xp.empty_like(gates)
        for t in range(steps - 1, -1, -1):
            if grad_seq is not None:
                dh += grad_seq[t]
            g, d = gates[t], d_gates[t]
            a, i, f, o = g[:, :n], g[:, n:2 * n], g[:, 2 * n:3 * n], g[:, 3 * n:]
            da, di, df, do = d[:, :n], d[:, n:2 * n], d[:, 2 * n:3 * n], d[:, 3 * n:]
            xp.multiply(dh, o, out=work)  # dc += dh * o * (1 - tanh(c)^2)
            xp.multiply(tanh_c[t], tanh_c[t], out=slope)
            xp.subtract(1, slope, out=slope)
            work *= slope
            dc += work
            xp.multiply(dh, tanh_c[t], out=do)
            xp.multiply(dc, i, out=da)
            xp.multiply(dc, a, out=di)
            xp.multiply(dc, self.c[t], out=df)
            dc *= f
            xp.multiply(a, a, out=slope)  # the activations' slopes: 1 - a^2, and s (1 - s) for the sigmoids
            xp.subtract(1, slope, out=slope)
            da *= slope
            d[:, n:] *= g[:, n:]
            xp.subtract(1, g[:, n:], out=g[:, n:])  # the gates are not needed after this step
            d[:, n:] *= g[:, n:]
            xp.matmul(d, weight, out=dh)
        flat = d_gates.reshape(steps * batch, 4 * n)
        grads = {4: dc, 5: dh}
        if 0 in indexes:
            grads[0] = (flat @ gate_major_rows(w_in)).reshape(steps, batch, n_in)
        if 1 in indexes or 3 in indexes:
            self.inputs_and_outputs[:, n_in:] = self.h[:-1].reshape(steps * batch, n)
            both = flat.T @ self.inputs_and_outputs
            grads[1], grads[3] = interleaved_rows(both[:, :n_in]), interleaved_rows(both[:, n_in:])
        if 2 in indexes:
            grads[2] = interleaved(flat.sum(axis=0))
        self.inputs_and_outputs = self.w_in = self.w_lateral = self.gates = self.h = self.c = self.tanh_c = None
        return tuple(chainer.Variable(grads[i]) for i in indexes)


# The factors folded into the reordered weights on the CPU: a's pre-activation times -2, i, f and o's times -1,
# so that one exp gives tanh(a) = 2 / (1 + exp(-2a)) - 1 and sigmoid(z) = 1 / (1 + exp(-z)).
EXP_SCALE = (-2.0, -1.0, -1.0, -1.0)


def gate_major(x, scale=None):
    """F.lstm's interleaved gates on the last axis (unit j's a, i, f, o side by side) as four blocks, a, i, f, o
    (a strided copy: ten times faster than gathering with an index array), each block times scale[gate] if given."""
    n = x.shape[-1] // 4
    return _gate_blocks(x, x.reshape(*x.shape[:-1], n, 4).swapaxes(-1, -2), scale, after_gate_axis=1)


def interleaved(x):
    """The inverse of gate_major."""
    xp = chainer.backend.get_array_module(x)
    n = x.shape[-1] // 4
    return xp.ascontiguousarray(xp.swapaxes(x.reshape(*x.shape[:-1], 4, n), -1, -2)).reshape(x.shape)


def gate_major_rows(w, scale=None):
    """gate_major for the rows of a (4 hidden, k) weight: whole rows move, so the copy streams."""
    return _gate_blocks(w, w.reshape(-1, 4, w.shape[1]).swapaxes(0, 1), scale, after_gate_axis=2)


def _gate_blocks(x, source, scale, after_gate_axis):
    """`source`, a gate-major view of x whose gate axis has `after_gate_axis` axes after it, copied into a
    contiguous array of x's shape; each gate's block times scale[gate] if given, in the same pass."""
    xp = chainer.backend.get_array_module(x)
    if scale is None:
        return xp.ascontiguousarray(source).reshape(x.shape)
    out = xp.empty(x.shape, np.float32)
    factors = xp.asarray(scale, np.float32).reshape((4,) + (1,) * after_gate_axis)
    xp.multiply(source, factors, out=out.reshape(source.shape))
    return out


def interleaved_rows(w):
    xp = chainer.backend.get_array_module(w)
    return xp.ascontiguousarray(w.reshape(4, -1, w.shape[1]).swapaxes(0, 1)).reshape(w.shape)


class ExpSigmoid(chainer.functions.activation.sigmoid.Sigmoid):
    """F.sigmoid, on the CPU as 1 / (1 + exp(-x)) (numpy's float32 exp costs a third of the tanh that F.sigmoid
    uses there); the same gradient, and the same function on a GPU."""

    def forward_cpu(self, inputs):
        y = np.negative(inputs[0])
        with np.errstate(over='ignore'):  # exp(large) = inf gives the exact limit 0
            np.exp(y, out=y)
        y += 1
        np.reciprocal(y, out=y)
        self.retain_outputs((0,))
        self._use_cudnn = False
        return y,





class LeanAdamRule(chainer.optimizers.adam.AdamRule):
    """Chainer's Adam step on the CPU, the same arithmetic in the same order (bit-identical, tested), done block
    by block: the 12 passes of a step run over one cache-sized block of the parameter, its gradient and moments
    before the next block is read, and the blocks are shared among the job's CPUs (numpy releases the GIL in
    its loops; each element's update is independent of the others, so the result is the same in any order).
    The plain version streams the LSTM's 3.5 M parameters through memory ~16 times an update."""

    def update_core_cpu(self, param):
        hp = self.hyperparam
        grad = param.grad
        if (grad is None or hp.amsgrad or hp.adabound or hp.weight_decay_rate or hp.eta != 1.0
                or param.dtype != np.float32 or not (param.data.flags.c_contiguous and grad.flags.c_contiguous)):
            return super().update_core_cpu(param)
        self._check_eps(np.float32)
        arrays = [a.reshape(-1) for a in (param.data, grad, self.state['m'], self.state['v'])]
        constants = (np.float32(1.0 - hp.beta1), np.float32(1.0 - hp.beta2), hp.eps, self.alpha_t)
        size = arrays[0].size
        pool, workers = update_pool()
        workers = workers if size >= 2 * ADAM_BLOCK else 1
        bounds = [size * k // workers for k in range(workers + 1)]
        ranges = list(zip(bounds[:-1], bounds[1:]))
        if workers == 1:
            _adam_blocks(arrays, constants, *ranges[0])
        else:
            list(pool.map(lambda r: _adam_blocks(arrays, constants, *r), ranges))


# Elements per block of LeanAdam's step (five float32 blocks of 512 KB: parameter, gradient, two moments, scratch).
# Smaller blocks cost more in Python than they save in cache misses: 16 K-element blocks were slower than none.
ADAM_BLOCK = 131072
_SCRATCH = threading.local()


def _adam_blocks(arrays, constants, begin, end):
    """Chainer's Adam arithmetic, in its order, on elements [begin, end) one block at a time."""
    param, grad, m, v = arrays
    one_minus_beta1, one_minus_beta2, eps, alpha_t = constants
    scratch = getattr(_SCRATCH, 'array', None)
    if scratch is None:
        scratch = _SCRATCH.array = np.empty(ADAM_BLOCK, np.float32)
    for start in range(begin, end, ADAM_BLOCK):
        stop = min(start + ADAM_BLOCK, end)
        s, g, mb, vb = scratch[:stop - start], grad[start:stop], m[start:stop], v[start:stop]
        np.subtract(g, mb, out=s)  # m += (1 - beta1) * (grad - m)
        s *= one_minus_beta1
        mb += s
        np.multiply(g, g, out=s)  # v += (1 - beta2) * (grad * grad - v)
        s -= vb
        s *= one_minus_beta2
        vb += s
        np.sqrt(vb, out=s)  # param -= alpha_t / (sqrt(v) + eps) * m
        s += eps
        np.divide(alpha_t, s, out=s)
        s *= mb
        param[start:stop] -= s


class LeanAdam(chainer.optimizers.Adam):
    """Adam with LeanAdamRule."""

    def create_update_rule(self):
        return LeanAdamRule(self.hyperparam)


_POOL = {}


def update_pool():
    """(thread pool, its size) for updating parameters side by side on the job's CPUs."""
    if not _POOL:
        import concurrent.futures
        _POOL['workers'] = max(1, min(4, usable_cpus()))
        _POOL['pool'] = concurrent.futures.ThreadPoolExecutor(_POOL['workers'])
    return _POOL['pool'], _POOL['workers']
