"""VGG16 with its 1000-way ImageNet head, and the ways to make `VGG.model` (its weights as a Chainer npz).

    python VGGNet.py --from-caffemodel VGG_ILSVRC_16_layers.caffemodel   # Caffe Model Zoo weights
    python VGGNet.py --from-npz VGG_ILSVRC_16_layers.npz                   # chainer.links.VGG16Layers' file
    python VGGNet.py --random --insize 64                                  # demo only: NOT ImageNet weights

Inputs are 3 x insize x insize, BGR minus the Caffe mean (helperFunctions.preprocess_frame). The real weights
are for insize 224; smaller inputs (multiples of 32) with random weights serve the tests and the demo.
"""
import argparse
import os
import sys

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from helperFunctions import DataError, atomic_path, exit_on_user_error

CONV_LAYERS = ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
               'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3']
BLOCKS = [2, 2, 3, 3, 3]          # convolutions per block, each block ends in 2x2 max pooling
WIDTHS = (64, 128, 256, 512, 512)  # channels per block in the real VGG16
HOW_TO_GET = ('Make it with `python VGGNet.py --from-caffemodel VGG_ILSVRC_16_layers.caffemodel` '
              '(http://www.robots.ox.ac.uk/~vgg/research/very_deep/) or `python VGGNet.py --from-npz FILE` from '
              "Chainer's VGG16Layers npz; `python VGGNet.py --random` makes random weights for a demo.")


def conv_forward(x, link, implementation):
    """3x3/pad 1 convolution by the chosen implementation: 'stock' Chainer, or 'fast' (fast_conv.py, which also
    brings its own 2x2 max pooling)."""
    if implementation == 'fast':
        import fast_conv
        return fast_conv.convolution_3x3(x, link.W, link.b)
    return F.convolution_2d(x, link.W, link.b, pad=1)


def pool_forward(x, implementation):
    if implementation == 'fast':
        import fast_conv
        return fast_conv.max_pooling_2x2(x)
    return F.max_pooling_2d(x, 2, 2)


class VGGTrunk(chainer.Chain):
    """conv1_1 ... conv5_3 and fc6, the layers VGGNet and VGGNet_1024 share (same names, so weights copy)."""

    def __init__(self, insize=224, widths=WIDTHS, fc6_size=4096, conv='stock'):
        super().__init__()
        if insize % 32:
            raise ValueError(f'insize must be a multiple of 32 (five 2x2 poolings), got {insize}')
        self.insize, self.conv = insize, conv
        with self.init_scope():
            channels, names, he = 3, iter(CONV_LAYERS), chainer.initializers.HeNormal()
            for width, n in zip(widths, BLOCKS):
                for _ in range(n):
                    # He initialisation keeps a randomly initialised (demo) network's activations from vanishing.
                    setattr(self, next(names), L.Convolution2D(channels, width, 3, 1, 1, initialW=he))
                    channels = width
            self.fc6 = L.Linear(channels * (insize // 32) ** 2, fc6_size)

    def pool5(self, x, graph_from=None):
        """conv1_1 ... pool5. The layers before `graph_from` (a convolution's name), or all of them when no graph
        is being built, run without a graph; with conv='fast' on the CPU they run as one fused pass
        (fast_conv.frozen_layers), the activations staying in its layout from layer to layer."""
        steps, names = [], iter(CONV_LAYERS)
        for n in BLOCKS:
            steps += [getattr(self, next(names)) for _ in range(n)] + [None]  # None: 2x2 max pooling
        if not chainer.config.enable_backprop or (graph_from and graph_from not in CONV_LAYERS):
            frozen = len(steps)
        else:
            frozen = steps.index(getattr(self, graph_from)) if graph_from else 0
        h = x.array if isinstance(x, chainer.Variable) else x
        if frozen and self.conv == 'fast' and isinstance(h, np.ndarray) and h.dtype == np.float32:
            import fast_conv
            h = fast_conv.frozen_layers(h, [(s.W.array, s.b.array) if s is not None else None
                                              for s in steps[:frozen]])
        else:
            with chainer.no_backprop_mode():
                h = self._run(h, steps[:frozen])
        return self._run(h, steps[frozen:])

    def _run(self, h, steps):
        for step in steps:
            h = F.relu(conv_forward(h, step, self.conv)) if step is not None else pool_forward(h, self.conv)
        return h

    def fc6_features(self, x, graph_from=None):
        """relu(fc6) before dropout (`graph_from`: as in pool5)."""
        return F.relu(self.fc6(self.pool5(x, graph_from)))


class VGGNet(VGGTrunk):
    """VGG16 for ImageNet: the trunk, fc7 (4096) and fc8 (1000 classes)."""

    def __init__(self, insize=224, widths=WIDTHS, fc_size=4096, n_classes=1000, conv='stock'):
        super().__init__(insize, widths, fc_size, conv)
        with self.init_scope():
            self.fc7 = L.Linear(fc_size, fc_size)
            self.fc8 = L.Linear(fc_size, n_classes)

    def forward(self, x):
        h = F.dropout(self.fc6_features(x), 0.5)
        h = F.dropout(F.relu(self.fc7(h)), 0.5)
        return self.fc8(h)


# ----------------------------------------------------------------------------------------------------------
# VGG.model: an npz of the link parameters ('conv1_1/W', ...) plus 'provenance' saying where they came from
# ----------------------------------------------------------------------------------------------------------

def shapes_from_params(params):
    """(insize, widths, fc_size, n_classes) of a VGG16 parameter dict; DataError if it is not one."""
    missing = [k for k in [f'{n}/{p}' for n in CONV_LAYERS + ['fc6', 'fc7', 'fc8'] for p in 'Wb'] if k not in params]
    if missing:
        raise DataError(f'not a VGG16 parameter set: no {", ".join(missing[:4])}')
    widths = tuple(params[f'{CONV_LAYERS[sum(BLOCKS[:i])]}/W'].shape[0] for i in range(len(BLOCKS)))
    fc6 = params['fc6/W'].shape
    cells = fc6[1] // widths[-1]
    side = int(round(cells ** 0.5))
    if side * side * widths[-1] != fc6[1]:
        raise DataError(f'fc6 takes {fc6[1]} inputs, which is not {widths[-1]} x side^2')
    return side * 32, widths, fc6[0], params['fc8/W'].shape[0]


def read_params(path, what='VGG16 weights', how=HOW_TO_GET):
    """{name: array} of a model file; DataError naming the file and how to make it if it is absent or broken."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: {what} not found. {how}')
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f'{path}: not a readable npz file of {what} ({e}). {how}') from e


def load_vgg(path, conv='stock'):
    """VGGNet with the weights of `path`, shaped as the file says; also returns its provenance string."""
    params = read_params(path)
    try:
        insize, widths, fc_size, n_classes = shapes_from_params(params)
    except DataError as e:
        raise DataError(f'{path}: {e}. {HOW_TO_GET}') from e
    model = VGGNet(insize, widths, fc_size, n_classes, conv)
    set_params(model, params, path)
    provenance = str(params['provenance']) if 'provenance' in params else 'unknown'
    if provenance.startswith('random'):
        print(f'NOTE: {path} holds RANDOM weights ({provenance}), not ImageNet ones: fine for the demo, '
              f'meaningless for real results. {HOW_TO_GET}', file=sys.stderr)
    return model, provenance


def set_params(model, params, source):
    """Copy {name: array} into the model's parameters, refusing any of another shape."""
    for name, param in model.namedparams():
        value = params[name.lstrip('/')]
        if value.shape != param.shape:
            raise DataError(f'{source}: {name} has shape {value.shape}, expected {param.shape}')
        param.array[...] = value


def save_model(model, path, provenance):
    """Write a model's parameters as an npz, atomically, with a note of where they came from."""
    arrays = {name.lstrip('/'): chainer.backends.cuda.to_cpu(p.array) for name, p in model.namedparams()}
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, provenance=np.array(provenance), **arrays)


def calibrate_random(model, batch=8, pixel_std=60.0, seed=0):
    """Data-free initialisation of a random VGG16 for the demo: every unit gets zero mean and unit spread on
    image-like input (layer-sequential, per channel).

    ImageNet weights bring features of a sane scale whose units switch on for some images and off for others.
    Random weights compound the input's +-100 pixel range over 14 layers, and after each ReLU every channel
    carries a large common offset, so the units barely differ between images and the new fc7 learns slowly.
    Centring and scaling each unit (weights and bias) fixes both.
    """
    h = np.random.RandomState(seed).normal(0, pixel_std, (batch, 3, model.insize, model.insize)).astype(np.float32)
    names = iter(CONV_LAYERS)

    def calibrate(link, x, axes):
        pre = (conv_forward(x, link, model.conv) if axes == (0, 2, 3) else link(x)).array
        mean, std = pre.mean(axis=axes), pre.std(axis=axes) + 1e-6
        link.W.array /= std.reshape((-1,) + (1,) * (link.W.ndim - 1))
        link.b.array[...] = (link.b.array - mean) / std

    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for n in BLOCKS:
            for _ in range(n):
                link = getattr(model, next(names))
                calibrate(link, h, (0, 2, 3))
                h = F.relu(conv_forward(h, link, model.conv))
            h = pool_forward(h, model.conv)
        for name in ('fc6', 'fc7'):
            link = getattr(model, name)
            calibrate(link, h, (0,))
            h = F.relu(link(h))


def params_from_caffemodel(path):
    """{'conv1_1/W': ..., ...} from Caffe's VGG_ILSVRC_16_layers.caffemodel (or any file of that layout)."""
    # Current protobuf releases refuse Chainer's generated caffe_pb2 in their C++ implementation.
    os.environ.setdefault('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION', 'python')
    from chainer.links.caffe.protobuf3 import caffe_pb2
    net = caffe_pb2.NetParameter()
    with open(path, 'rb') as f:
        net.MergeFromString(f.read())
    layers = {layer.name: layer for layer in (net.layer or net.layers)}
    params = {}
    for name in CONV_LAYERS + ['fc6', 'fc7', 'fc8']:
        if name not in layers or len(layers[name].blobs) != 2:
            raise DataError(f'{path}: no layer {name!r} with weights and bias; is this VGG_ILSVRC_16_layers?')
        w, b = layers[name].blobs
        wshape = tuple(w.shape.dim) or (w.num, w.channels, w.height, w.width)
        w = np.array(w.data, np.float32).reshape(wshape)
        params[f'{name}/W'] = w.reshape(w.shape[-2:]) if name.startswith('fc') else w
        params[f'{name}/b'] = np.array(b.data, np.float32).reshape(-1)
    return params


def convert(source, out, kind):
    if not os.path.isfile(source):
        raise DataError(f'{source}: file not found')
    params = params_from_caffemodel(source) if kind == 'caffe' else read_params(source)
    insize, widths, fc_size, n_classes = shapes_from_params(params)
    model = VGGNet(insize, widths, fc_size, n_classes)
    set_params(model, params, source)
    save_model(model, out, f'{kind}:{os.path.basename(source)}')
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--from-caffemodel', metavar='FILE', help="Caffe's VGG_ILSVRC_16_layers.caffemodel")
    source.add_argument('--from-npz', metavar='FILE', help="chainer.links.VGG16Layers' converted npz")
    source.add_argument('--random', action='store_true', help='random weights, labelled as such (demo only)')
    p.add_argument('--out', '-o', default='VGG.model')
    p.add_argument('--insize', type=int, default=224, help='input side for --random (multiple of 32)')
    p.add_argument('--widths', type=int, nargs=5, default=WIDTHS, help='channels per block for --random '
                   '(narrower than VGG16 makes a fast demo network of the same shape)')
    p.add_argument('--fc-size', type=int, default=4096, help='fc6/fc7 width for --random')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    with exit_on_user_error():
        if args.random:
            np.random.seed(args.seed)
            model = VGGNet(args.insize, tuple(args.widths), args.fc_size)
            calibrate_random(model, seed=args.seed)
            save_model(model, args.out, f'random-init(seed={args.seed},insize={args.insize},'
                                        f'widths={"x".join(map(str, args.widths))},fc={args.fc_size})')
        elif args.from_caffemodel:
            model = convert(args.from_caffemodel, args.out, 'caffe')
        else:
            model = convert(args.from_npz, args.out, 'npz')
    print(f'wrote {args.out}: VGG16 for {model.insize}x{model.insize} inputs, {model.fc8.W.shape[0]} classes',
          file=sys.stderr)


if __name__ == '__main__':
    main()
