"""VGG16 with its 1000-way ImageNet head, and the ways to make `VGG.model` (its weights as a Chainer npz).

    python VGGNet.py --from-caffemodel VGG_ILSVRC_16_layers.caffemodel   # Caffe Model Zoo weights
    python VGGNet.py --from-npz VGG_ILSVRC_16_layers.npz                   # chainer.links.VGG16Layers' file
    python VGGNet.py --random --insize 64                                  # demo only: NOT ImageNet weights

Inputs are 3 x insize x insize, BGR minus the Caffe mean (ucf/preprocessing.py). The real weights
are for insize 224; smaller inputs (multiples of 32) with random weights serve the tests and the demo.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import contextlib
import os
import sys

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from ucf import fast_conv
from ucf.caffemodel import caffemodel_layers
from ucf.errors import DataError
from ucf.files import atomic_path, read_npz
from ucf.flags import positive_int
from ucf.provenance import array_digest, make_provenance, parse_provenance, provenance_text
from ucf.runcontrol import exit_on_user_error

CONV_LAYERS = ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
               'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3']
FC_LAYERS = ['fc6', 'fc7', 'fc8']
BLOCKS = [2, 2, 3, 3, 3]          # convolutions per block, each block ends in 2x2 max pooling
WIDTHS = (64, 128, 256, 512, 512)  # channels per block in the real VGG16
HOW_TO_GET = ('Make it with `python VGGNet.py --from-caffemodel VGG_ILSVRC_16_layers.caffemodel` '
              '(http://www.robots.ox.ac.uk/~vgg/research/very_deep/) or `python VGGNet.py --from-npz FILE` from '
              "Chainer's VGG16Layers npz; `python VGGNet.py --random` makes random weights for a demo.")


LAYERS = CONV_LAYERS + FC_LAYERS  # bottom to top: --train-from names one of them


def stock_convolution(x, link):
    return F.convolution_2d(x, link.W, link.b, pad=1)


def stock_pooling(x):
    return F.max_pooling_2d(x, 2, 2)


def fast_convolution(x, link):
    return fast_conv.convolution_3x3(x, link.W, link.b)


# conv: (3x3 convolution, 2x2 max pooling, fused pass of the layers that build no graph, or None)
IMPLEMENTATIONS = {'stock': (stock_convolution, stock_pooling, None),
                   'fast': (fast_convolution, fast_conv.max_pooling_2x2, fast_conv.frozen_layers)}


class VGGTrunk(chainer.Chain):
    """conv1_1 ... conv5_3 and fc6, the layers VGGNet and VGGNet_1024 share (same names, so weights copy).

    Two choices are made here, once: `conv`, how convolutions and poolings run ('stock' Chainer or 'fast',
    ucf/fast_conv.py; GPU arrays use Chainer's own either way), and `train_from`, the lowest layer that learns:
    `learns(layer)` is the one place that decides which layers build a graph and get updates. `in_channels`: 3 for
    RGB frames, 2L for the flow stream's stacks of L fields.
    """

    def __init__(self, insize=224, widths=WIDTHS, fc6_size=4096, conv='stock', train_from='conv1_1', in_channels=3):
        super().__init__()
        if insize % 32:
            raise ValueError(f'insize must be a multiple of 32 (five 2x2 poolings), got {insize}')
        if train_from not in LAYERS:
            raise ValueError(f'unknown layer {train_from!r}; one of {", ".join(LAYERS)}')
        self.insize, self.conv, self.train_from = insize, conv, train_from
        self.convolve, self.pool, self.frozen_pass = IMPLEMENTATIONS[conv]
        with self.init_scope():
            channels, names, he = in_channels, iter(CONV_LAYERS), chainer.initializers.HeNormal()
            for width, n in zip(widths, BLOCKS):
                for _ in range(n):
                    # He initialisation keeps a randomly initialised (demo) network's activations from vanishing.
                    setattr(self, next(names), L.Convolution2D(channels, width, 3, 1, 1, initialW=he))
                    channels = width
            self.fc6 = L.Linear(channels * (insize // 32) ** 2, fc6_size)

    def learns(self, layer):
        """Whether `layer` learns: it is --train-from or above it."""
        return LAYERS.index(layer) >= LAYERS.index(self.train_from)

    def pool5(self, x):
        """conv1_1 ... pool5. The layers that do not learn, or all of them when no graph is being built, run
        without a graph; with conv='fast' on the CPU they run as one fused pass (fast_conv.frozen_layers), the
        activations staying in its layout from layer to layer."""
        steps, names = [], iter(CONV_LAYERS)
        for n in BLOCKS:
            steps += [getattr(self, next(names)) for _ in range(n)] + [None]  # None: 2x2 max pooling
        learning = [i for i, s in enumerate(steps) if s is not None and self.learns(s.name)]
        frozen = learning[0] if learning and chainer.config.enable_backprop else len(steps)
        h = x.array if isinstance(x, chainer.Variable) else x
        if frozen and self.frozen_pass and isinstance(h, np.ndarray) and h.dtype == np.float32:
            h = self.frozen_pass(h, [(s.W.array, s.b.array) if s is not None else None for s in steps[:frozen]])
        else:
            with chainer.no_backprop_mode():
                h = self._run(h, steps[:frozen])
        return self._run(h, steps[frozen:])

    def _run(self, h, steps):
        for step in steps:
            h = F.relu(self.convolve(h, step)) if step is not None else self.pool(h)
        return h

    def fc6_features(self, x):
        """relu(fc6) before dropout."""
        h = self.pool5(x)
        with graph_if(self.learns('fc6')):
            return F.relu(self.fc6(h))

    @property
    def in_channels(self):
        return self.conv1_1.W.shape[1]

    @property
    def widths(self):
        """Channels per block, (64, 128, 256, 512, 512) in the real VGG16."""
        return tuple(getattr(self, CONV_LAYERS[sum(BLOCKS[:i])]).W.shape[0] for i in range(len(BLOCKS)))


def graph_if(learns):
    """Build a graph for a layer that learns; run one that does not without."""
    return contextlib.nullcontext() if learns else chainer.no_backprop_mode()


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

def expected_shapes(insize, widths, fc_size, n_classes, fc7_size=None, in_channels=3):
    """{parameter name: shape} of VGG16 for these sizes (fc7_size: VGGNet_1024's narrower fc7; in_channels: the flow
    stream's 2L)."""
    shapes, channels = {}, in_channels
    for block, (count, width) in enumerate(zip(BLOCKS, widths)):
        for i in range(count):
            name = f'conv{block + 1}_{i + 1}'
            shapes[f'{name}/W'], shapes[f'{name}/b'] = (width, channels, 3, 3), (width,)
            channels = width
    cells = channels * (insize // 32) ** 2
    fc7_size = fc7_size or fc_size
    for name, shape in zip(FC_LAYERS, [(fc_size, cells), (fc7_size, fc_size), (n_classes, fc7_size)]):
        shapes[f'{name}/W'], shapes[f'{name}/b'] = shape, shape[:1]
    return shapes


def memory_needed(insize, widths, fc_size, n_classes, fc7_size, batchsize, training, in_channels=3):
    """{what: bytes}, a lower bound of what a pass over one batch holds at once, for check_memory(): the weights
    (fc7/fc8 scale with --feature-size), in training the fc layers' gradients and momentum and every convolution's
    output kept for the backward pass, in inference the widest layer's input and output."""
    shapes = expected_shapes(insize, widths, fc_size, n_classes, fc7_size, in_channels)
    params = sum(int(np.prod(shape)) for shape in shapes.values())
    learned = sum(int(np.prod(shapes[f'{name}/{kind}'])) for name in FC_LAYERS[1:] for kind in 'Wb')
    sides = [insize >> block for block in range(len(BLOCKS))]
    frames = f'{batchsize} frames at a time (--batchsize)'
    if training:
        kept = sum(width * count * side ** 2 for width, count, side in zip(widths, BLOCKS, sides))
        return {'the weights (fc7, fc8: --feature-size)': 4 * params,
                'fc7/fc8 gradients and momentum (--feature-size)': 8 * learned,
                f'the activations of {frames}': 4 * batchsize * (in_channels * insize ** 2 + kept)}
    widest = max(width * side ** 2 for width, side in zip(widths, sides))
    return {'the weights': 4 * params,
            f'the activations of {frames}': 4 * batchsize * (in_channels * insize ** 2 + 2 * widest)}


def shapes_from_params(params):
    """(insize, widths, fc_size, n_classes) of a VGG16 parameter dict; DataError if it is not exactly one:
    a missing or extra parameter (VGG19's conv3_4, say) or any shape that does not fit."""
    names = [f'{n}/{p}' for n in CONV_LAYERS + FC_LAYERS for p in 'Wb']
    missing = [k for k in names if k not in params]
    if missing:
        raise DataError(f'not a VGG16 parameter set: no {", ".join(missing[:4])}')
    extra = sorted(k for k in params if k not in names and k != 'provenance')
    if extra:
        raise DataError(f'not a VGG16 parameter set: it also holds {", ".join(extra[:6])}'
                        + (' (a VGG19?)' if any(k.startswith('conv3_4') for k in extra) else ''))
    widths = tuple(params[f'{CONV_LAYERS[sum(BLOCKS[:i])]}/W'].shape[0] for i in range(len(BLOCKS)))
    fc6 = params['fc6/W'].shape
    cells = fc6[1] // widths[-1] if len(fc6) == 2 else 0
    side = int(round(cells ** 0.5))
    if len(fc6) != 2 or side * side * widths[-1] != fc6[1]:
        raise DataError(f'fc6 has shape {fc6}, which does not take {widths[-1]} x side x side inputs')
    sizes = side * 32, widths, fc6[0], params['fc8/W'].shape[0]
    for name, shape in expected_shapes(*sizes, fc7_size=params['fc7/W'].shape[0],
                                       in_channels=input_channels(params)).items():
        if params[name].shape != shape:
            raise DataError(f'not a VGG16 parameter set: {name} has shape {params[name].shape}, expected {shape}')
    return sizes


def input_channels(params):
    """The channels conv1_1 takes: 3 (RGB), or 2L (a flow stream's stack of L fields)."""
    shape = params['conv1_1/W'].shape
    return shape[1] if len(shape) == 4 else 3


def read_params(path, what='VGG16 weights', how=HOW_TO_GET):
    """{name: array} of a model file; DataError naming the file and how to make it if it is absent or broken."""
    return read_npz(path, what, how)


def load_vgg(path, conv='stock'):
    """VGGNet with the weights of `path`, shaped as the file says; also returns its provenance record (with the
    weights' digest: recorded when the file was written, computed now for files from before records)."""
    params = read_params(path)
    try:
        insize, widths, fc_size, n_classes = shapes_from_params(params)
    except DataError as e:
        raise DataError(f'{path}: {e}. {HOW_TO_GET}') from e
    if input_channels(params) != 3:
        raise DataError(f'{path}: its conv1_1 takes {input_channels(params)} channels, not RGB\'s 3: not ImageNet '
                        f'VGG16 weights (a flow model?). {HOW_TO_GET}')
    model = VGGNet(insize, widths, fc_size, n_classes, conv)
    set_params(model, params, path)
    provenance = model_provenance(path, params)
    if provenance['source'].startswith('random'):
        print(f'NOTE: {path} holds RANDOM weights ({provenance["source"]}), not ImageNet ones: fine for the demo, '
              f'meaningless for real results. {HOW_TO_GET}', file=sys.stderr)
    return model, provenance


def model_provenance(path, params):
    """The record of a model file, with its path and its weights' digest (always present)."""
    record = parse_provenance(params.get('provenance'))
    record.setdefault('digest', array_digest({k: v for k, v in params.items() if k != 'provenance'}))
    record.setdefault('source', record.get('step', 'unknown'))
    return dict(record, path=os.path.abspath(path))


def set_params(model, params, source):
    """Copy {name: array} into the model's parameters, refusing any of another shape."""
    for name, param in model.namedparams():
        value = params[name.lstrip('/')]
        if value.shape != param.shape:
            raise DataError(f'{source}: {name} has shape {value.shape}, expected {param.shape}')
        param.array[...] = value


def save_model(model, path, provenance):
    """Write a model's parameters as an npz, atomically, with its provenance record (a dict; the weights' digest
    is added)."""
    save_params(path, {name.lstrip('/'): chainer.backends.cuda.to_cpu(p.array) for name, p in model.namedparams()},
                provenance)


def save_params(path, arrays, provenance):
    record = dict(provenance, digest=array_digest(arrays))
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, provenance=np.array(provenance_text(record)), **arrays)
    return record


def calibrate_random(model, batch=8, pixel_std=60.0, seed=0, frames=None):
    """Data-free initialisation of a random VGG16 for the demo: every unit gets zero mean and unit spread on
    image-like input (layer-sequential, per channel).

    ImageNet weights bring features of a sane scale whose units switch on for some images and off for others.
    Random weights compound the input's +-100 pixel range over 14 layers, and after each ReLU every channel
    carries a large common offset, so the units barely differ between images and the new fc7 learns slowly.
    Centring and scaling each unit (weights and bias) fixes both. `frames` (preprocessed, N x 3 x insize x
    insize) calibrates on those instead of Gaussian noise of `pixel_std`.
    """
    h = frames if frames is not None else np.random.RandomState(seed).normal(
        0, pixel_std, (batch, 3, model.insize, model.insize)).astype(np.float32)
    names = iter(CONV_LAYERS)

    def calibrate(link, x, axes):
        pre = (model.convolve(x, link) if axes == (0, 2, 3) else link(x)).array
        mean, std = pre.mean(axis=axes), pre.std(axis=axes) + 1e-6
        link.W.array /= std.reshape((-1,) + (1,) * (link.W.ndim - 1))
        link.b.array[...] = (link.b.array - mean) / std

    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for n in BLOCKS:
            for _ in range(n):
                link = getattr(model, next(names))
                calibrate(link, h, (0, 2, 3))
                h = F.relu(model.convolve(h, link))
            h = model.pool(h)
        for name in ('fc6', 'fc7'):
            link = getattr(model, name)
            calibrate(link, h, (0,))
            h = F.relu(link(h))


# ----------------------------------------------------------------------------------------------------------
# VGG16 from Caffe's VGG_ILSVRC_16_layers.caffemodel, and the command line
# ----------------------------------------------------------------------------------------------------------

def params_from_caffemodel(path):
    """{'conv1_1/W': ..., ...} from a caffemodel of VGG16's layout (ucf/caffemodel.py reads the file). DataError
    for a truncated file, a file of another kind, or another architecture (VGG19's conv3_4, missing layers, other
    shapes)."""
    layers = caffemodel_layers(path)
    if not layers:
        raise DataError(f'{path}: holds no layer with weights: not a caffemodel of VGG16 '
                        '(VGG_ILSVRC_16_layers.caffemodel is about 553 MB)')
    expected = CONV_LAYERS + FC_LAYERS
    extra, missing = [n for n in layers if n not in expected], [n for n in expected if n not in layers]
    if extra or missing:
        raise DataError(f'{path}: not VGG16: ' + '; '.join(
            ([f'layers VGG16 does not have: {", ".join(extra)}' + (' (a VGG19?)' if 'conv3_4' in extra else '')]
             if extra else []) + ([f'no layer {", ".join(missing)}'] if missing else [])))
    params = {}
    for name in expected:
        if len(layers[name]) != 2:
            raise DataError(f'{path}: layer {name} has {len(layers[name])} blobs, expected weights and bias')
        w, b = layers[name]
        b = b.reshape(-1)
        if name in FC_LAYERS and b.size and w.size % b.size == 0:
            w = w.reshape(b.size, -1)  # the old layout stores (1, 1, out, in)
        params[f'{name}/W'] = w
        params[f'{name}/b'] = b
    return params


def convert(source, out, kind):
    """Write VGG.model from a caffemodel or an npz of VGG16; returns (insize, widths, fc_size, n_classes)."""
    if not os.path.isfile(source):
        raise DataError(f'{source}: file not found')
    params = params_from_caffemodel(source) if kind == 'caffe' else read_params(source, 'VGG16 weights', '')
    params.pop('provenance', None)
    try:
        sizes = shapes_from_params(params)
    except DataError as e:
        raise DataError(f'{source}: {e}') from None
    save_params(out, params, make_provenance('VGGNet.py', source=f'{kind}:{os.path.basename(source)}'))
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()  # one is needed: checked after parsing, so a typo is named first
    source.add_argument('--from-caffemodel', metavar='FILE', help="Caffe's VGG_ILSVRC_16_layers.caffemodel")
    source.add_argument('--from-npz', metavar='FILE', help="chainer.links.VGG16Layers' converted npz")
    source.add_argument('--random', action='store_true', help='random weights, labelled as such (demo only)')
    p.add_argument('--out', '-o', default='VGG.model')
    p.add_argument('--insize', type=positive_int, default=224, help='input side for --random (multiple of 32)')
    p.add_argument('--widths', type=positive_int, nargs=5, default=WIDTHS, help='channels per block for --random '
                   '(narrower than VGG16 makes a fast demo network of the same shape)')
    p.add_argument('--fc-size', type=positive_int, default=4096, help='fc6/fc7 width for --random')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if not (args.from_caffemodel or args.from_npz or args.random):
        p.error('say where the weights come from: --from-caffemodel FILE, --from-npz FILE or --random')
    if args.insize % 32:
        p.error(f'--insize {args.insize} is not a multiple of 32 (five 2x2 poolings halve it): try '
                f'{max(32, round(args.insize / 32) * 32)}')
    with exit_on_user_error():
        if args.random:
            np.random.seed(args.seed)
            model = VGGNet(args.insize, tuple(args.widths), args.fc_size)
            calibrate_random(model, seed=args.seed)
            save_model(model, args.out, make_provenance(
                'VGGNet.py', source=f'random-init(seed={args.seed},insize={args.insize},'
                                    f'widths={"x".join(map(str, args.widths))},fc={args.fc_size})'))
            insize, n_classes = model.insize, model.fc8.W.shape[0]
        else:
            kind, source = ('caffe', args.from_caffemodel) if args.from_caffemodel else ('npz', args.from_npz)
            insize, _, _, n_classes = convert(source, args.out, kind)
    what = 'RANDOM VGG16 weights (for a demo or a check; meaningless for real results)' if args.random else 'VGG16'
    print(f'wrote {args.out}: {what} for {insize}x{insize} inputs, {n_classes} classes', file=sys.stderr)


if __name__ == '__main__':
    main()
