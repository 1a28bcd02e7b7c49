"""A 3x3, stride 1, pad 1 convolution for the CPU that never builds an im2col buffer.

Chainer's CPU convolution copies every input pixel nine times into an im2col matrix (about 880 MiB for one VGG16
layer at batch 8) and spends its time moving memory. Here the input is zero-padded once and laid out channel by
channel as one long row per channel, images side by side; a shift of the 3x3 window is then just an offset into
that row. Block by block of positions, the nine shifted views are stacked and multiplied by all the weights in
one matrix product. Each output row computed this way has two extra columns (the padding) that are dropped.

The function is the same as F.convolution_2d(x, W, b, pad=1) up to float32 rounding (tests compare them), and
differentiable (the gradients use the same layout). Arrays on a GPU go to Chainer's own (cuDNN) convolution.
"""
import chainer
import chainer.functions as F
import numpy as np

BLOCK_BYTES = 8 << 20  # size of one block of stacked shifted views


def _padded_rows(x):
    """(N, C, H, W) -> (C, N*(H+3)*(W+2)) buffer: each image padded by 1 (and one extra bottom row, so the
    last shifted view stays inside it), images concatenated along the row."""
    n, c, h, w = x.shape
    buf = np.empty((c, n, h + 3, w + 2), x.dtype)
    buf[:, :, 0] = 0  # zero only the border: filling the whole buffer first costs a pass over memory
    buf[:, :, h + 1:] = 0
    buf[:, :, 1:h + 1, 0] = 0
    buf[:, :, 1:h + 1, w + 1] = 0
    buf[:, :, 1:h + 1, 1:w + 1] = x.transpose(1, 0, 2, 3)
    return buf.reshape(c, -1)


def _correlate(rows, weights, n, h, w):
    """rows (C, N*(H+3)*(W+2)), weights (O, C, 3, 3) -> (O, N*(H+3)*(W+2)) where position p holds the output
    whose window starts at p (valid for the first H rows and W columns of each image; the rest is not defined).

    Block by block of positions, the nine shifted views are stacked into a (9C x block) matrix and multiplied
    by the (O x 9C) weights in one product: a long inner dimension keeps the matrix multiply near its peak,
    and the block keeps the stacked copy small (the stock im2col copies the whole batch at once)."""
    out_channels, channels = weights.shape[:2]
    stride = w + 2
    offsets = [i * stride + j for i in range(3) for j in range(3)]
    taps = np.ascontiguousarray(weights.transpose(0, 2, 3, 1).reshape(out_channels, 9 * channels))
    total = rows.shape[1] - (2 * stride + 2)  # the last offset must stay inside the buffer
    out = np.empty((out_channels, rows.shape[1]), rows.dtype)
    block = max(256, BLOCK_BYTES // (36 * channels))
    stacked = np.empty((9, channels, block), rows.dtype)
    for start in range(0, total, block):
        end = min(start + block, total)
        size = end - start
        for tap, offset in enumerate(offsets):
            stacked[tap, :, :size] = rows[:, start + offset:end + offset]
        np.matmul(taps, stacked[:, :, :size].reshape(9 * channels, size), out=out[:, start:end])
    return out


def _unpad(out, n, h, w):
    """(O, N*(H+3)*(W+2)) -> (N, O, H, W)."""
    return out.reshape(out.shape[0], n, h + 3, w + 2)[:, :, :h, :w].transpose(1, 0, 2, 3)


class Convolution3x3(chainer.function_node.FunctionNode):

    def forward_cpu(self, inputs):
        x, W = inputs[:2]
        n, _, h, w = x.shape
        self.retain_inputs((0, 1))
        out = _correlate(_padded_rows(x), W, n, h, w)
        if len(inputs) == 3:
            out += inputs[2][:, None]  # cheaper here, row by row, than on the transposed result
        return np.ascontiguousarray(_unpad(out, n, h, w)),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        x, W, gy = x.array, W.array, gy.array
        n, _, h, w = x.shape
        results = []
        if 0 in indexes:  # correlation of gy with the flipped, transposed kernel
            flipped = np.ascontiguousarray(W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
            results.append(chainer.Variable(np.ascontiguousarray(
                _unpad(_correlate(_padded_rows(gy), flipped, n, h, w), n, h, w))))
        if 1 in indexes:  # gW[:, :, i, j] = gy . x shifted by (i, j), in the same padded layout
            stride = w + 2
            rows = _padded_rows(x)
            grid = np.zeros((gy.shape[1], n, h + 3, w + 2), gy.dtype)
            grid[:, :, :h, :w] = gy.transpose(1, 0, 2, 3)
            grid = grid.reshape(gy.shape[1], -1)
            total = rows.shape[1] - (2 * stride + 2)
            gW = np.empty_like(W)
            for i in range(3):
                for j in range(3):
                    offset = i * stride + j
                    gW[:, :, i, j] = grid[:, :total] @ rows[:, offset:offset + total].T
            results.append(chainer.Variable(gW))
        if 2 in indexes:
            results.append(chainer.Variable(gy.sum(axis=(0, 2, 3))))
        return results


def convolution_3x3(x, W, b=None):
    """F.convolution_2d(x, W, b, pad=1) for 3x3 kernels, without im2col on the CPU."""
    array = x.array if isinstance(x, chainer.Variable) else x
    if not isinstance(array, np.ndarray) or W.shape[2:] != (3, 3):
        return F.convolution_2d(x, W, b, pad=1)
    inputs = (x, W) if b is None else (x, W, b)
    return Convolution3x3().apply(inputs)[0]


class MaxPooling2x2(chainer.function_node.FunctionNode):
    """2x2 max pooling, stride 2, on even-sized inputs: two elementwise maxima over strided views, where
    Chainer's CPU pooling builds an im2col buffer (about 10x slower on VGG16's first block)."""

    def forward_cpu(self, inputs):
        x, = inputs
        n, c, h, w = x.shape
        self.retain_inputs((0,))
        rows = x.reshape(n, c, h // 2, 2 * w)
        pairs = np.maximum(rows[:, :, :, :w], rows[:, :, :, w:])
        y = np.maximum(pairs[..., 0::2], pairs[..., 1::2])
        self.retain_outputs((0,))
        return y,

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        y, = self.get_retained_outputs()
        x, y, gy = x.array, y.array, grad_outputs[0].array
        gx = np.zeros_like(x)
        taken = np.zeros(y.shape, bool)
        for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the first maximum of a window gets the gradient, as stock
            hit = (x[:, :, i::2, j::2] == y) & ~taken
            gx[:, :, i::2, j::2] = np.where(hit, gy, 0)
            taken |= hit
        return chainer.Variable(gx),


def max_pooling_2x2(x):
    """F.max_pooling_2d(x, 2, 2) on the CPU without im2col; other cases go to Chainer's own."""
    array = x.array if isinstance(x, chainer.Variable) else x
    if not isinstance(array, np.ndarray) or array.shape[2] % 2 or array.shape[3] % 2:
        return F.max_pooling_2d(x, 2, 2)
    return MaxPooling2x2().apply((x,))[0]
