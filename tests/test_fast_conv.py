"""fast_conv.convolution_3x3 is F.convolution_2d(pad=1) up to float32 rounding, forward and backward."""
import chainer
import chainer.functions as F
import numpy as np
import pytest

import VGGNet_1024
from ucf import fast_conv


@pytest.mark.parametrize('shape,out,bias', [((2, 5, 7, 9), 4, True), ((1, 3, 1, 1), 2, False),
                                            ((3, 16, 12, 10), 8, True), ((2, 24, 9, 13), 17, True)])
@pytest.mark.parametrize('block_bytes', [fast_conv.BLOCK_BYTES, 4096])  # one block, and many
def test_matches_stock_convolution(shape, out, bias, block_bytes, monkeypatch):
    monkeypatch.setattr(fast_conv, 'BLOCK_BYTES', block_bytes)
    monkeypatch.setattr(fast_conv, 'OUT_BLOCK_BYTES', block_bytes // 4)
    rng = np.random.RandomState(0)
    x = rng.normal(size=shape).astype(np.float32)
    W = rng.normal(size=(out, shape[1], 3, 3)).astype(np.float32)
    b = rng.normal(size=out).astype(np.float32) if bias else None
    gy = rng.normal(size=(shape[0], out) + shape[2:]).astype(np.float32)
    grads = []
    for conv in (lambda *a: F.convolution_2d(*a, pad=1), fast_conv.convolution_3x3):
        variables = [chainer.Variable(a) for a in (x, W) + ((b,) if bias else ())]
        y = conv(*variables)
        y.grad = gy
        y.backward()
        grads.append([y.array] + [v.grad for v in variables])
    for stock, fast in zip(*grads):
        assert stock.shape == fast.shape
        assert np.allclose(stock, fast, rtol=1e-4, atol=1e-4 * np.abs(stock).max())


def test_vgg_fast_and_stock_agree():
    stock = VGGNet_1024.VGGNet_1024(4, 32, (4, 4, 8, 8, 8), 32, 16, conv='stock')
    fast = VGGNet_1024.VGGNet_1024(4, 32, (4, 4, 8, 8, 8), 32, 16, conv='fast')
    fast.copyparams(stock)
    x = np.random.RandomState(1).normal(0, 50, (3, 3, 32, 32)).astype(np.float32)
    for a, b in zip(stock.predict(x), fast.predict(x)):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_max_pooling_matches_stock_including_ties():
    rng = np.random.RandomState(0)
    x = np.maximum(rng.normal(size=(2, 3, 6, 8)), 0).astype(np.float32)  # ReLU output: many tied zeros
    x[0, 0, :2, :2] = 1.0  # a window of four equal maxima
    gy = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    results = []
    for pool in (lambda v: F.max_pooling_2d(v, 2, 2), fast_conv.max_pooling_2x2):
        v = chainer.Variable(x)
        y = pool(v)
        y.grad = gy
        y.backward()
        results.append((y.array, v.grad))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_numpy_uses_openblas_here():
    """The pinned numpy wheel carries OpenBLAS with its 64-bit interface: without it fast_conv still works (the
    stacking path, tested below) but at about 0.8x the speed, so its absence in this environment is a bug."""
    assert fast_conv._sgemm() is not None, 'cblas_sgemm64_ not found in the BLAS numpy loaded'


def stock_layers(x, layers):
    h = x
    for layer in layers:
        h = F.max_pooling_2d(h, 2, 2) if layer is None else F.relu(F.convolution_2d(h, *layer, pad=1))
    return h.array


@pytest.mark.parametrize('blas', ['openblas', 'numpy only'])
@pytest.mark.parametrize('block_bytes', [None, 1])  # one block a layer, and many (256 positions each)
def test_frozen_layers_match_stock(blas, block_bytes, monkeypatch):
    if blas == 'numpy only':
        monkeypatch.setattr(fast_conv, '_openblas_cache', [None, None])
    if block_bytes:
        monkeypatch.setattr(fast_conv, 'OUT_BLOCK_BYTES', block_bytes)
        monkeypatch.setattr(fast_conv, 'BLOCK_BYTES', block_bytes)
    rng = np.random.RandomState(0)

    def conv(c, o):
        return ((rng.normal(size=(o, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32),
                rng.normal(0, 0.1, o).astype(np.float32))
    # 3 channels in (the stacking path), then 16+ (the in-place path where OpenBLAS is found); not square
    layers = [conv(3, 16), conv(16, 24), None, conv(24, 32), None, conv(32, 5), conv(5, 20)]
    x = rng.normal(0, 50, (3, 3, 20, 12)).astype(np.float32)
    expected = stock_layers(x, layers)
    got = fast_conv.frozen_layers(x, layers)
    assert got.shape == expected.shape == (3, 20, 5, 3) and got.flags.c_contiguous
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert (expected > 0).mean() > 0.2  # not a trivial comparison of zeros


def test_tap_weights_with_and_without_openblas_transpose(monkeypatch):
    weights = np.random.RandomState(0).normal(size=(70, 300, 3, 3)).astype(np.float32)
    expected = weights.transpose(2, 3, 0, 1).reshape(9, 70, 300)
    assert np.array_equal(fast_conv._tap_weights(weights), expected)
    monkeypatch.setattr(fast_conv, '_openblas_cache', [None, None])
    assert np.array_equal(fast_conv._tap_weights(weights), expected)


def test_training_below_a_convolution_matches_stock():
    """train_from a convolution: the layers below run fused without a graph, the rest through the functions;
    loss and gradients as with stock Chainer, and no gradient for the frozen layers."""
    results = []
    for conv in ('stock', 'fast'):
        np.random.seed(3)
        model = VGGNet_1024.VGGNet_1024(5, 32, (16, 16, 16, 24, 24), 32, 16, conv=conv, train_from='conv4_2',
                                        dropout=0)
        x = np.random.RandomState(1).normal(0, 50, (2, 3, 32, 32)).astype(np.float32)
        model.cleargrads()
        loss = model(x, np.array([1, 3], np.int32))
        loss.backward()
        assert model.conv4_1.W.grad is None and model.conv4_2.W.grad is not None
        results.append([loss.array, model.conv4_2.W.grad, model.conv5_3.W.grad, model.fc7.W.grad])
    for stock, fast in zip(*results):
        assert np.allclose(stock, fast, rtol=1e-3, atol=1e-4 * np.abs(stock).max())


def test_frozen_layers_reuse_their_buffers_safely():
    """Buffers are reused from call to call (fresh pages cost a fault each); results must not alias them, and
    a smaller call after a larger one (and back) must not read stale values from the padding."""
    rng = np.random.RandomState(5)
    layers = [(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), rng.normal(size=16).astype(np.float32)),
              (rng.normal(size=(16, 16, 3, 3)).astype(np.float32) / 12, rng.normal(size=16).astype(np.float32)),
              None]
    inputs = [rng.normal(0, 10, shape).astype(np.float32) for shape in ((4, 3, 24, 40), (1, 3, 8, 6),
                                                                           (2, 3, 24, 40))]
    results = [fast_conv.frozen_layers(x, layers) for x in inputs]
    for x, got in zip(inputs, results):  # checked after all calls: earlier results were not overwritten
        expected = stock_layers(x, layers)
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
