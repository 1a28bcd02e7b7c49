"""VGG16's 3x3 convolutions (stride 1, pad 1) and 2x2 max pooling on the CPU, without im2col buffers.

Chainer's CPU convolution copies every input pixel nine times into an im2col matrix (about 880 MiB for one VGG16
layer at batch 8) and spends most of its time moving memory. Here the input is zero-padded once and laid out
channel by channel as one long row per channel ("padded rows", see `_layout`: the images' lines side by side,
one zero between lines, one line of zeros between images). A shift of the 3x3 window is then an offset into that
row, so the input shifted by one tap is a plain strided view of it, and the convolution is nine matrix products
accumulated in place, (O x C) weights times the (C x positions) shifted view, read straight from the padded rows
by OpenBLAS (its cblas_sgemm, called with beta = 1). Positions whose window straddles a padding compute
by-products, zeroed afterwards. Block by block of positions, so the block being accumulated stays in cache;
bias and ReLU are applied to a block while it is there.

Where OpenBLAS's cblas_sgemm cannot be reached (a numpy built on another BLAS), for inputs of few channels
(conv1_1: 3) and for few positions (14x14 at batch 1), the nine shifted views of a block are stacked into one
(9C x block) matrix and multiplied by all the weights at once instead.

Two ways in:
- `convolution_3x3` and `max_pooling_2x2`: Chainer functions, differentiable, the same as F.convolution_2d(x, W,
  b, pad=1) and F.max_pooling_2d(x, 2, 2) up to float32 rounding (tests compare them, gradients included).
- `frozen_layers`: a run of conv+ReLU and pooling layers with no gradient needed (the frozen trunk in
  fine-tuning, everything in extraction). Activations stay in the padded-rows layout from layer to layer: each
  convolution writes straight into the next layer's padded input, and pooling reads and writes that layout,
  so no layer pays for a transpose or a copy into a padded buffer.

Arrays on a GPU go to Chainer's own (cuDNN) functions.
"""
import ctypes
import os
import threading

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import chainer.functions as F
import numpy as np

BLOCK_BYTES = 8 << 20      # stacked views of one block (the stacking path)
OUT_BLOCK_BYTES = 4 << 20  # output block accumulated while it is in cache (the in-place path)
MIN_CHANNELS = 16          # fewer input channels: stacking (a 3-long inner dimension starves the multiply)
MIN_POSITIONS = 512        # fewer positions (a 14x14 image): stacking (one long product beats nine short ones)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
SYMBOL_PREFIXES = ('', 'scipy_')  # numpy 1.26's OpenBLAS, numpy 2's scipy-openblas
_openblas_cache = []
_local = threading.local()


def _find_openblas():
    """(cblas_sgemm, cblas_somatcopy, description) of the OpenBLAS that numpy uses, each None where missing.
    numpy's wheels
    ship OpenBLAS with 64-bit integers and the symbol suffix 64_ (numpy 1.26: cblas_sgemm64_; numpy 2's
    scipy-openblas also prefixes scipy_: scipy_cblas_sgemm64_); only that interface is used, and only after a
    check against numpy's own results."""
    try:
        import threadpoolctl
        libraries = [i for i in threadpoolctl.threadpool_info() if i.get('user_api') == 'blas']
    except Exception:  # threadpoolctl missing or confused: the stacking path needs none of this
        return None, None, None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    for info in libraries:
        try:
            library = ctypes.CDLL(info['filepath'])
        except OSError:
            continue
        prefix = next((p for p in SYMBOL_PREFIXES if hasattr(library, p + 'cblas_sgemm64_')), None)
        if prefix is None:
            continue
        sgemm = getattr(library, prefix + 'cblas_sgemm64_')
        sgemm.argtypes = [i64] * 6 + [f32, ptr, i64, ptr, i64, f32, ptr, i64]
        sgemm.restype = None
        if not _sgemm_works(sgemm):
            continue
        transpose = getattr(library, prefix + 'cblas_somatcopy64_', None)
        if transpose is not None:
            transpose.argtypes = [i64] * 4 + [f32, ptr, i64, ptr, i64]
            transpose.restype = None
            if not _transpose_works(transpose):
                transpose = None
        description = (f"{info.get('internal_api', 'BLAS')} {info.get('version') or ''} "
                       f"({prefix}cblas_sgemm64_, {info.get('architecture') or 'unknown'} kernels, "
                       f"{os.path.basename(info['filepath'])})")
        return sgemm, transpose, description
    return None, None, None


def _sgemm_works(function):
    rng = np.random.RandomState(0)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(7, 13)).astype(np.float32)
    c = rng.normal(size=(5, 11)).astype(np.float32)
    expected = c.copy()
    expected[:, 1:10] += a @ b[:, 2:11]
    function(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, 5, 9, 7, 1.0, a.ctypes.data, 7, b.ctypes.data + 8, 13, 1.0,
             c.ctypes.data + 4, 11)
    return np.allclose(c, expected, rtol=1e-5, atol=1e-5)


def _transpose_works(function):
    a = np.arange(21, dtype=np.float32).reshape(7, 3)
    b = np.zeros((3, 7), np.float32)
    function(_ROW_MAJOR, _TRANS, 7, 3, 1.0, a.ctypes.data, 3, b.ctypes.data, 7)
    return np.array_equal(a.T, b)


def _openblas():
    if not _openblas_cache:
        _openblas_cache.extend(_find_openblas())
    return _openblas_cache


def _sgemm():
    return _openblas()[0]


def blas_in_use():
    """Which BLAS the fast path multiplies with (library, version, symbol, kernels), or None: the stacking path."""
    return _openblas()[2]


def _tap_weights(weights):
    """(O, C, 3, 3) -> (9, O, C): one contiguous (O x C) matrix per tap. OpenBLAS's out-of-place transpose does
    it about 20x faster than numpy's strided copy (0.6 ms against 10 ms for a 512 x 512 layer, which matters at
    batch 1)."""
    out_channels, channels = weights.shape[:2]
    source = np.ascontiguousarray(weights, np.float32).reshape(out_channels * channels, 9)
    taps = _scratch('taps', (9, out_channels, channels))
    transpose = _openblas()[1]
    if transpose is not None:
        transpose(_ROW_MAJOR, _TRANS, out_channels * channels, 9, 1.0, source.ctypes.data, 9, taps.ctypes.data,
                  out_channels * channels)
    else:
        flat, chunk = taps.reshape(9, -1), 1 << 14  # chunks that stay in cache while they are transposed
        for start in range(0, flat.shape[1], chunk):
            flat[:, start:start + chunk] = source[start:start + chunk].T
    return taps


def _scratch(key, shape, dtype=np.float32):
    """A reusable array for this thread's temporaries. Fresh memory is not free: the kernel zeroes every page
    on its first touch, and a new buffer for each layer's output costs several percent of a forward pass."""
    buffers = _local.__dict__.setdefault('buffers', {})
    size = int(np.prod(shape))
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffers[key] = buffer = None  # let the old one go first
        buffer = buffers[key] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def _padded_rows(x, key=None):
    """(N, C, H, W) -> (C, length) padded rows: see `_layout` (in scratch buffer `key`, if given)."""
    n, c, h, w = x.shape
    rows = _layout(c, n, h, w, x.dtype, key)
    _pixels(rows, n, h, w)[...] = x.transpose(1, 0, 2, 3)
    return rows


def _layout(channels, n, h, w, dtype, key=None):
    """An empty padded-rows buffer, its padding zeroed: per channel one row of (1 + N(H+1)) x (W+1) values and
    one more. Every line of W pixels starts with one zero (the left padding of its pixels and the right padding
    of the line before); one line of W+1 zeros precedes each image and follows the last, each shared by the
    images on both sides. Against a separate (H+2) x (W+2) border per image, this wastes less on by-products
    at the small sizes: 13% of the positions of a 14x14 image, not 28%."""
    shape = (channels, (1 + n * (h + 1)) * (w + 1) + 1)
    rows = _scratch(key, shape, dtype) if key else np.empty(shape, dtype)
    _zero_padding(rows, n, h, w)
    return rows


def _zero_padding(rows, n, h, w):
    """Zero the padding of padded rows (not the whole buffer: that would be a pass over memory)."""
    grid = rows[:, :-1].reshape(rows.shape[0], 1 + n * (h + 1), w + 1)
    grid[:, ::h + 1] = 0
    grid[:, :, 0] = 0
    rows[:, -1] = 0


def _pixels(rows, n, h, w):
    """The (C, N, H, W) view of the pixels in padded rows."""
    return rows[:, w + 2:w + 2 + n * (h + 1) * (w + 1)].reshape(rows.shape[0], n, h + 1, w + 1)[:, :, :h, :w]


def _finish_block(block, bias, relu):
    if bias is not None:
        block += bias[:, None]
    if relu:
        np.maximum(block, 0, out=block)


def _blocks(total, block):
    """Starts and sizes of about equal blocks of at most `block` positions covering `total`."""
    count = -(-total // block)
    size = -(-total // count)
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _correlate(rows, weights, n, h, w, out=None, bias=None, relu=False):
    """Padded rows (C, length), weights (O, C, 3, 3) -> padded rows (O, length) of the convolution (plus bias,
    through ReLU if asked): its pixels are where `_pixels` finds them; its padding holds by-products (or is not
    written) and must be zeroed before it is used as a layer's input."""
    out_channels, channels = weights.shape[:2]
    length = rows.shape[1]
    stride = w + 1
    shift = stride + 1  # from the window's first position to its centre
    total = length - 2 * shift  # window positions whose nine taps stay inside the buffer
    if out is None:
        out = np.empty((out_channels, length), rows.dtype)
    offsets = [i * stride + j for i in range(3) for j in range(3)]
    sgemm = _sgemm() if channels >= MIN_CHANNELS else None
    in_place = (sgemm is not None and rows.dtype == weights.dtype == out.dtype == np.float32
                and rows.flags.c_contiguous and out.flags.c_contiguous and total >= MIN_POSITIONS)
    if in_place:
        taps = _tap_weights(weights)
        item = rows.itemsize
        for start, size in _blocks(total, max(256, OUT_BLOCK_BYTES // (4 * out_channels))):
            target = out.ctypes.data + (shift + start) * item
            for tap, offset in enumerate(offsets):
                sgemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, out_channels, size, channels, 1.0, taps[tap].ctypes.data,
                      channels, rows.ctypes.data + (start + offset) * item, length, 1.0 if tap else 0.0, target,
                      length)
            _finish_block(out[:, shift + start:shift + start + size], bias, relu)
        return out
    weights = weights.reshape(out_channels, 9 * channels)  # (channel, tap) order: stacked the same way
    block = max(256, BLOCK_BYTES // (36 * channels))
    stacked = _scratch('stacked', (channels, 9, block), rows.dtype)
    for start, size in _blocks(total, block):
        for tap, offset in enumerate(offsets):
            stacked[:, tap, :size] = rows[:, start + offset:start + offset + size]
        target = out[:, shift + start:shift + start + size]
        np.matmul(weights, stacked[:, :, :size].reshape(9 * channels, size), out=target)
        _finish_block(target, bias, relu)
    return out


def _pool_rows(rows, n, h, w, key=None, bias=None, relu=False):
    """2x2 max pooling from padded rows of H x W images to padded rows of the H/2 x W/2 result; then bias and
    ReLU if given (the same as before pooling, on a quarter of the values: both commute with the maximum)."""
    pixels = _pixels(rows, n, h, w)
    pairs = np.maximum(pixels[:, :, 0::2], pixels[:, :, 1::2])
    out = _layout(rows.shape[0], n, h // 2, w // 2, rows.dtype, key)
    pooled = _pixels(out, n, h // 2, w // 2)
    np.maximum(pairs[..., 0::2], pairs[..., 1::2], out=pooled)
    if bias is not None:
        pooled += bias[:, None, None, None]
    if relu:
        np.maximum(pooled, 0, out=pooled)
    return out


def frozen_layers(x, layers):
    """Forward pass, no gradients, through `layers` (each (W, b) for a 3x3 convolution + ReLU, or None for 2x2
    max pooling) of a (N, C, H, W) numpy array; the same as the Chainer functions up to float32 rounding."""
    n, _, h, w = x.shape
    keys = ['activations', 'activations2']  # each layer reads one and writes the other
    rows = _padded_rows(x, keys[0])
    pending = None  # the bias of a convolution whose bias and ReLU wait for the pooling after it
    for i, layer in enumerate(layers):
        keys.reverse()
        if layer is None:
            if h % 2 or w % 2:
                raise ValueError(f'2x2 pooling of an odd-sized input ({h}x{w})')
            rows = _pool_rows(rows, n, h, w, keys[0], pending, relu=pending is not None)
            h, w, pending = h // 2, w // 2, None
            continue
        weights, bias = layer
        out = _scratch(keys[0], (weights.shape[0], rows.shape[1]), rows.dtype)
        if i + 1 < len(layers) and layers[i + 1] is None:  # pooling next: it reads the pixels alone
            rows, pending = _correlate(rows, weights, n, h, w, out), bias
        else:  # the output is the next layer's input as it stands, once its padding is zeroed
            rows = _correlate(rows, weights, n, h, w, out, bias=bias, relu=True)
            _zero_padding(rows, n, h, w)
    return np.array(_pixels(rows, n, h, w).transpose(1, 0, 2, 3), order='C')  # a copy: not the scratch buffer


class Convolution3x3(chainer.function_node.FunctionNode):

    def forward_cpu(self, inputs):
        x, W = inputs[:2]
        n, _, h, w = x.shape
        self.retain_inputs((0, 1))
        out = _correlate(_padded_rows(x), W, n, h, w, bias=inputs[2] if len(inputs) == 3 else None)
        return np.ascontiguousarray(_pixels(out, n, h, w).transpose(1, 0, 2, 3)),

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        gy, = grad_outputs
        x, W, gy = x.array, W.array, gy.array
        n, _, h, w = x.shape
        results = []
        if 0 in indexes:  # correlation of gy with the flipped, transposed kernel
            flipped = np.ascontiguousarray(W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
            gx = _correlate(_padded_rows(gy), flipped, n, h, w)
            results.append(chainer.Variable(np.ascontiguousarray(_pixels(gx, n, h, w).transpose(1, 0, 2, 3))))
        if 1 in indexes:  # gW[:, :, i, j] = gy . x shifted by (i, j), in the same padded rows
            rows = _padded_rows(x)
            stride = w + 1
            total = rows.shape[1] - 2 * (stride + 1)
            window = _padded_rows(gy)[:, stride + 1:stride + 1 + total]  # gy at its window's first position
            gW = np.empty_like(W)
            for i in range(3):
                for j in range(3):
                    offset = i * stride + j
                    gW[:, :, i, j] = window @ rows[:, offset:offset + total].T
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
