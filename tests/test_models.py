"""VGGNet, VGGNet_1024, the weight converters and the weight transfer."""
import os

import chainer
import numpy as np
import pytest

import VGGNet
import VGGNet_1024
from helperFunctions import DataError

WIDTHS = (4, 4, 8, 8, 8)


def small_params(rng, insize=32, widths=WIDTHS, fc=16, classes=10):
    model = VGGNet.VGGNet(insize, widths, fc, classes)
    return {name.lstrip('/'): rng.normal(0, 0.1, p.shape).astype(np.float32) for name, p in model.namedparams()}


def write_caffemodel(path, params):
    os.environ.setdefault('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION', 'python')
    from chainer.links.caffe.protobuf3 import caffe_pb2
    net = caffe_pb2.NetParameter(name='VGG_ILSVRC_16_layers')
    data = net.layer.add(name='data', type='Input')  # a layer without weights, as in the real file
    data.top.append('data')
    for name in VGGNet.CONV_LAYERS + ['fc6', 'fc7', 'fc8']:
        layer = net.layer.add(name=name, type='Convolution' if name.startswith('conv') else 'InnerProduct')
        for key in ('W', 'b'):
            value = params[f'{name}/{key}']
            blob = layer.blobs.add()
            blob.shape.dim.extend(value.shape)
            blob.data.extend(value.ravel().tolist())
        net.layer.add(name=f'relu_{name}', type='ReLU')
    with open(path, 'wb') as f:
        f.write(net.SerializeToString())


def test_caffemodel_converter(tmp_path):
    params = small_params(np.random.RandomState(0))
    write_caffemodel(tmp_path / 'VGG_ILSVRC_16_layers.caffemodel', params)
    VGGNet.main(['--from-caffemodel', str(tmp_path / 'VGG_ILSVRC_16_layers.caffemodel'),
                 '-o', str(tmp_path / 'VGG.model')])
    model, provenance = VGGNet.load_vgg(str(tmp_path / 'VGG.model'))
    assert provenance == 'caffe:VGG_ILSVRC_16_layers.caffemodel' and model.insize == 32
    for name, p in model.namedparams():
        assert np.array_equal(p.array, params[name.lstrip('/')]), name


def test_chainer_npz_converter(tmp_path):
    params = small_params(np.random.RandomState(1))
    np.savez(tmp_path / 'vgg16.npz', **params)  # the key layout of chainer.links.VGG16Layers' file
    VGGNet.main(['--from-npz', str(tmp_path / 'vgg16.npz'), '-o', str(tmp_path / 'VGG.model')])
    model, provenance = VGGNet.load_vgg(str(tmp_path / 'VGG.model'))
    assert provenance == 'npz:vgg16.npz'
    assert all(np.array_equal(p.array, params[n.lstrip('/')]) for n, p in model.namedparams())


def test_missing_and_wrong_vgg_model(tmp_path):
    with pytest.raises(DataError, match='VGG.model: VGG16 weights not found.*--from-caffemodel'):
        VGGNet.load_vgg(str(tmp_path / 'VGG.model'))
    params = small_params(np.random.RandomState(2))
    del params['conv3_2/W']
    with open(tmp_path / 'bad.model', 'wb') as f:
        np.savez(f, **params)
    with pytest.raises(DataError, match=r'bad.model: not a VGG16 parameter set: no conv3_2/W'):
        VGGNet.load_vgg(str(tmp_path / 'bad.model'))
    (tmp_path / 'junk.model').write_bytes(b'not a zip file')
    with pytest.raises(DataError, match='junk.model: not a readable npz'):
        VGGNet.load_vgg(str(tmp_path / 'junk.model'))
    with pytest.raises(SystemExit, match='error: .*nothing.caffemodel: file not found'):
        VGGNet.main(['--from-caffemodel', str(tmp_path / 'nothing.caffemodel'), '-o', str(tmp_path / 'x')])
    assert not (tmp_path / 'x').exists()


def test_weight_transfer_to_vggnet_1024(small_vgg):
    vgg, _ = VGGNet.load_vgg(small_vgg)
    model = VGGNet_1024.from_vgg(vgg, n_classes=7, feature_size=12)
    for name in VGGNet.CONV_LAYERS + ['fc6']:
        for key in 'Wb':
            assert np.array_equal(getattr(getattr(model, name), key).array, getattr(getattr(vgg, name), key).array)
    assert model.fc7.W.shape == (12, 32) and model.fc8.W.shape == (7, 12)
    assert not np.array_equal(model.fc7.W.array, vgg.fc7.W.array[:12, :32])
    x = np.random.RandomState(0).normal(0, 50, (2, 3, 32, 32)).astype(np.float32)
    with chainer.using_config('train', False):
        assert np.allclose(model.fc6_features(x).array, vgg.fc6_features(x).array)
    prob, feature = model.predict(x)
    assert prob.shape == (2, 7) and feature.shape == (2, 12)
    assert np.allclose(prob.sum(axis=1), 1, atol=1e-5) and (feature >= 0).all()


def test_only_trainable_layers_update(small_vgg):
    vgg, _ = VGGNet.load_vgg(small_vgg)
    model = VGGNet_1024.from_vgg(vgg, n_classes=3, feature_size=8, train_from='fc7')
    before = {n: p.array.copy() for n, p in model.namedparams()}
    optimizer = chainer.optimizers.MomentumSGD(lr=0.1)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(0.1))  # would shrink frozen weights too
    model.freeze_below_train_from()
    x = np.random.RandomState(0).normal(0, 50, (4, 3, 32, 32)).astype(np.float32)
    t = np.array([0, 1, 2, 0], np.int32)
    optimizer.update(model, x, t)
    changed = {n.split('/')[1] for n, p in model.namedparams() if not np.array_equal(p.array, before[n])}
    assert changed == {'fc7', 'fc8'}
    model.cleargrads()
    model(x, t).backward()
    assert model.conv1_1.W.grad is None and model.fc6.W.grad is None  # the frozen part builds no graph
    assert model.fc7.W.grad is not None


def test_vgg16_full_size_shapes():
    """The real configuration: 224x224 input, VGG16 widths, 4096-wide fc6, fc7 1024, 101 classes."""
    np.random.seed(0)
    model = VGGNet_1024.VGGNet_1024(n_classes=101)
    assert model.fc6.W.shape == (4096, 512 * 7 * 7) and model.fc7.W.shape == (1024, 4096)
    assert model.fc8.W.shape == (101, 1024)
    x = np.zeros((1, 3, 224, 224), np.float32)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        assert model.pool5(x).shape == (1, 512, 7, 7)
    prob, feature = model.predict(x)
    assert prob.shape == (1, 101) and feature.shape == (1, 1024)


def test_insize_must_divide_by_32():
    with pytest.raises(ValueError, match='multiple of 32'):
        VGGNet.VGGNet(100)
