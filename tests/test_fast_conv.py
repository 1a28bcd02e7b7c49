"""fast_conv.convolution_3x3 is F.convolution_2d(pad=1) up to float32 rounding, forward and backward."""
import chainer
import chainer.functions as F
import numpy as np
import pytest

import VGGNet_1024
import fast_conv


@pytest.mark.parametrize('shape,out,bias', [((2, 5, 7, 9), 4, True), ((1, 3, 1, 1), 2, False),
                                            ((3, 16, 12, 10), 8, True)])
@pytest.mark.parametrize('block_bytes', [fast_conv.BLOCK_BYTES, 4096])  # one block, and many
def test_matches_stock_convolution(shape, out, bias, block_bytes, monkeypatch):
    monkeypatch.setattr(fast_conv, 'BLOCK_BYTES', block_bytes)
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
