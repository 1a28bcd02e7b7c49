"""VGGNet, VGGNet_1024, the weight converters and the weight transfer."""
import os

import chainer
import numpy as np
import pytest

import VGGNet
import VGGNet_1024
from tools import bench
from ucf.errors import DataError

WIDTHS = (4, 4, 8, 8, 8)


def small_params(rng, insize=32, widths=WIDTHS, fc=16, classes=10):
    model = VGGNet.VGGNet(insize, widths, fc, classes)
    return {name.lstrip('/'): rng.normal(0, 0.1, p.shape).astype(np.float32) for name, p in model.namedparams()}


def protobuf_caffemodel(layers, layout):
    """Caffe's own serialisation (the protobuf library with Chainer's caffe_pb2) of [(name, type, arrays)]:
    'old' = V1 `layers` with num/channels/height/width (VGG_ILSVRC_16_layers.caffemodel), 'new' = `layer`."""
    os.environ.setdefault('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION', 'python')
    from chainer.links.caffe.protobuf3 import caffe_pb2
    net = caffe_pb2.NetParameter(name='VGG_ILSVRC_16_layers')
    for name, kind, arrays in layers:
        if layout == 'old':
            layer = net.layers.add(name=name, type=getattr(caffe_pb2.V1LayerParameter, kind.upper().replace(
                'INNERPRODUCT', 'INNER_PRODUCT')))
        else:
            layer = net.layer.add(name=name, type=kind)
        for value in arrays:
            blob = layer.blobs.add()
            if layout == 'old':
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - value.ndim) + value.shape
            else:
                blob.shape.dim.extend(value.shape)
            blob.data.extend(value.ravel().tolist())
    return net.SerializeToString()


def small_layers(seed=0, **sizes):
    return bench.vgg16_layers(np.random.default_rng(seed), **{**dict(insize=32, widths=WIDTHS, fc=16,
                                                                      classes=10), **sizes})


@pytest.mark.parametrize('layout', ['old', 'new'])
def test_caffemodel_writer_is_byte_for_byte_caffes(tmp_path, layout):
    """bench.py's streaming writer (which makes the 553 MB file) writes what protobuf itself writes."""
    layers = small_layers()
    bench.write_caffemodel(tmp_path / 'fast.caffemodel', layers, layout)
    assert (tmp_path / 'fast.caffemodel').read_bytes() == protobuf_caffemodel(layers, layout)


@pytest.mark.parametrize('layout', ['old', 'new'])
def test_caffemodel_converter(tmp_path, layout):
    layers = small_layers()
    (tmp_path / 'VGG_ILSVRC_16_layers.caffemodel').write_bytes(protobuf_caffemodel(layers, layout))
    VGGNet.main(['--from-caffemodel', str(tmp_path / 'VGG_ILSVRC_16_layers.caffemodel'),
                 '-o', str(tmp_path / 'VGG.model')])
    model, provenance = VGGNet.load_vgg(str(tmp_path / 'VGG.model'))
    assert provenance['source'] == 'caffe:VGG_ILSVRC_16_layers.caffemodel' and model.insize == 32
    assert provenance['step'] == 'VGGNet.py' and len(provenance['digest']) == 16 and provenance['code']
    weights = {name: arrays for name, _, arrays in layers}
    for name, p in model.namedparams():
        layer, key = name.lstrip('/').split('/')
        assert np.array_equal(p.array, weights[layer]['Wb'.index(key)]), name


def refused(tmp_path, data, match):
    path = tmp_path / 'model.caffemodel'
    path.write_bytes(data)
    with pytest.raises(SystemExit, match=match) as e:
        VGGNet.main(['--from-caffemodel', str(path), '-o', str(tmp_path / 'VGG.model')])
    assert len(str(e.value).splitlines()) == 1 and 'model.caffemodel' in str(e.value)
    assert not (tmp_path / 'VGG.model').exists()


def test_caffemodel_of_another_architecture_is_refused(tmp_path):
    layers = small_layers()
    conv3_3 = next(i for i, (name, _, _) in enumerate(layers) if name == 'conv3_3')
    vgg19 = layers[:conv3_3 + 1] + [('conv3_4', 'Convolution', layers[conv3_3][2])] + layers[conv3_3 + 1:]
    refused(tmp_path, protobuf_caffemodel(vgg19, 'old'), r'not VGG16: layers VGG16 does not have: conv3_4 \(a VGG19\?\)')
    no_fc8 = [layer for layer in layers if layer[0] != 'fc8']
    refused(tmp_path, protobuf_caffemodel(no_fc8, 'new'), 'not VGG16: no layer fc8')
    wide = [(n, k, [np.zeros((5, 4, 3, 3), np.float32), a[1]] if n == 'conv1_2' else a) for n, k, a in layers]
    refused(tmp_path, protobuf_caffemodel(wide, 'new'), r'conv1_2/W has shape \(5, 4, 3, 3\), expected \(4, 4, 3, 3\)')


def test_truncated_or_foreign_caffemodel_is_refused(tmp_path):
    data = protobuf_caffemodel(small_layers(), 'old')
    for cut in (len(data) - 3, len(data) // 2, 40):
        refused(tmp_path, data[:cut], 'the caffemodel is cut short .*download it again')
    refused(tmp_path, np.random.RandomState(0).bytes(5000), 'not a caffemodel')
    refused(tmp_path, b'Some text, not a model\n' * 20, 'not a caffemodel')
    refused(tmp_path, b'', 'holds no layer with weights')
    (tmp_path / 'x.npz').write_bytes(b'')
    refused(tmp_path, (tmp_path / 'x.npz').read_bytes(), 'holds no layer')


def test_npz_with_extra_parameters_is_refused(tmp_path):
    params = small_params(np.random.RandomState(1))
    params['conv3_4/W'] = params['conv3_3/W']
    np.savez(tmp_path / 'vgg19.npz', **params)
    with pytest.raises(SystemExit, match=r'vgg19.npz: not a VGG16 parameter set: it also holds conv3_4/W \(a VGG19\?\)'):
        VGGNet.main(['--from-npz', str(tmp_path / 'vgg19.npz'), '-o', str(tmp_path / 'VGG.model')])
    assert not (tmp_path / 'VGG.model').exists()


def test_chainer_npz_converter(tmp_path):
    params = small_params(np.random.RandomState(1))
    np.savez(tmp_path / 'vgg16.npz', **params)  # the key layout of chainer.links.VGG16Layers' file
    VGGNet.main(['--from-npz', str(tmp_path / 'vgg16.npz'), '-o', str(tmp_path / 'VGG.model')])
    model, provenance = VGGNet.load_vgg(str(tmp_path / 'VGG.model'))
    assert provenance['source'] == 'npz:vgg16.npz'
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


def test_code_version_without_git(monkeypatch):
    """A cluster node without git: the code is still identified, by the digest of its files."""
    from ucf import provenance
    monkeypatch.setattr(provenance, '_CODE', [])
    monkeypatch.setenv('PATH', '/nonexistent')
    version = provenance.code_version()
    assert version.startswith('py:') and 'git:' not in version
