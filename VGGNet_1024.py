"""VGG16 fine-tuned for UCF-101: conv1_1 ... fc6 from VGGNet, a new fc7 (4096 -> 1024) and fc8 (1024 -> classes).

Training calls the model with (frames, labels) and gets the loss (loss and accuracy are reported);
extraction calls `predict(frames)` and gets the softmax and the 1024-d relu(fc7) feature of every frame.
"""
from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from VGGNet import (CONV_LAYERS, LAYERS, WIDTHS, VGGTrunk, graph_if, input_channels, model_provenance, read_params,
                    save_model, set_params, shapes_from_params)
from ucf.errors import DataError


# What extraction keeps of every frame, by name: saveFeatures_1024.py writes one folder of .npy files per output.
OUTPUTS = ('features', 'predictions')


class VGGNet_1024(VGGTrunk):

    def __init__(self, n_classes=101, insize=224, widths=WIDTHS, fc6_size=4096, feature_size=1024, conv='stock',
                 train_from='fc7', dropout=0.5, in_channels=3):
        super().__init__(insize, widths, fc6_size, conv, train_from, in_channels)
        self.dropout = dropout  # after fc6 and fc7 in training, as in VGG16
        with self.init_scope():
            self.fc7 = L.Linear(fc6_size, feature_size)
            self.fc8 = L.Linear(feature_size, n_classes)

    def freeze_below_train_from(self):
        """Stop the optimizer from touching the layers below `train_from` (weight decay included).

        Call it after optimizer.setup(model): update rules, which carry the switch, exist only from then on.
        """
        for name in LAYERS:
            link = getattr(self, name)
            (link.enable_update if self.learns(name) else link.disable_update)()

    def fc7_features(self, x):
        """relu(fc7): the 1024-d feature saved for the LSTM."""
        h = self.fc6_features(x)
        with graph_if(self.learns('fc7')):
            return F.relu(self.fc7(F.dropout(h, self.dropout)))

    def forward(self, x, t):
        y = self.fc8(F.dropout(self.fc7_features(x), self.dropout))
        loss = F.softmax_cross_entropy(y, t)
        chainer.report({'loss': loss, 'accuracy': F.accuracy(y, t)}, self)
        return loss

    def predict(self, x):
        """(softmax, fc7 feature) of a batch of frames, in test mode (no dropout), as arrays."""
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            h = self.fc7_features(x)
            return F.softmax(self.fc8(h)).array, chainer.as_array(h)

    def outputs(self, x):
        """{output name (OUTPUTS): array} of a batch of frames, in test mode: the fc7 feature, the softmax."""
        prob, feature = self.predict(x)
        return {'features': feature, 'predictions': prob}


def from_vgg(vgg, n_classes, feature_size=1024, train_from='fc7', seed=None, dropout=0.5, in_channels=3):
    """A VGGNet_1024 whose conv1_1 ... fc6 are copies of `vgg`'s and whose fc7, fc8 are new. With in_channels
    other than 3 (the flow stream's 2L), conv1_1's filters are the RGB ones averaged over colour and replicated
    over the channels (cross-modality initialisation, Wang et al. 2016); its bias is RGB's."""
    if seed is not None:
        np.random.seed(seed)
    model = VGGNet_1024(n_classes, vgg.insize, vgg.widths, vgg.fc6.W.shape[0], feature_size, vgg.conv, train_from,
                        dropout, in_channels)
    for name in CONV_LAYERS + ['fc6']:
        if name == 'conv1_1' and in_channels != vgg.in_channels:
            mean = vgg.conv1_1.W.array.mean(axis=1, keepdims=True)
            model.conv1_1.W.array[...] = np.repeat(mean, in_channels, axis=1)
            model.conv1_1.b.array[...] = vgg.conv1_1.b.array
        else:
            getattr(model, name).copyparams(getattr(vgg, name))
    return model


def load_model(path, conv='stock', train_from='fc7', stream=None):
    """A VGGNet_1024 with the weights of `path` (VGG_1024.model), shaped as the file says; `model.stream` says
    which stream it sees ('rgb', or 'flow' with the settings `model.flow`). With `stream`, a model of another
    stream is refused."""
    params = read_params(path, what='fine-tuned VGGNet_1024 weights',
                         how='Make it with `python frameBasedTrain.py` (Part 1).')
    try:
        insize, widths, fc6_size, n_classes = shapes_from_params(params)
    except DataError as e:
        raise DataError(f'{path}: {e}; is this a VGGNet_1024 model file?') from e
    model = VGGNet_1024(n_classes, insize, widths, fc6_size, params['fc7/W'].shape[0], conv, train_from,
                        in_channels=input_channels(params))
    set_params(model, params, path)
    model.provenance = model_provenance(path, params)  # what made it: its split, its weights' digest
    model.stream = model.provenance.get('stream', 'rgb')
    model.flow = model.provenance.get('flow')
    if stream is not None and model.stream != stream:
        raise DataError(f'{path} is a model of the {model.stream} stream ({model.in_channels} input channels), not '
                        f'of the {stream} stream: pass --stream {model.stream}, or the {stream} model '
                        f'(frameBasedTrain.py --stream {stream} makes it)')
    return model


__all__ = ['VGGNet_1024', 'OUTPUTS', 'from_vgg', 'load_model', 'save_model', 'LAYERS']
