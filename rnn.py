"""Part 3: an LSTM over the normalised fc7 feature sequences of the clips.

    python rnn.py                                  # the starter: 1 LSTM layer, sequences of 120, BPTT 30
    python rnn.py --lstm-layers 2 --dropout 0.3 --inference full segments weighted

The starter model: LSTM (1024 -> 512) -> Linear + sigmoid (512) -> Linear (101 classes), applied at every time
step; the loss of every step counts (--loss-weighting shifts it toward the end of the sequence). Training
sequences are --seqlen frames: a random segment of a longer clip, a shorter clip padded by playing it backwards
and forwards again (the handout's rule, helperFunctions.repeatSequence; --padding loop, hold or crop avoid the
reversed motion it puts into a sequence, and the log says how many clips were padded). Back-propagation is
truncated every --bptt frames: the state is carried on, the graph is cut, the weights are updated.

Each epoch prints the training loss and accuracy (the accuracy of the last step, which the handout warns
flatters), then the test accuracy `Accuracy(top 1, top 5, top 10): (a,b,c)` of every --inference technique
(full, last, weighted, segments: see --inference below). The first technique's per-clip scores go to
lstm_results.npz for confusion.py.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import collections
import sys
import time

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import chainer.functions as F
import chainer.links as L
import matplotlib
import numpy as np
from chainer import training
from chainer.training import extensions

from helperFunctions import PADDING, pad_sequence
from ucf.errors import DataError, warn
from ucf.fast_lstm import ExpSigmoid, LeanAdam, LSTMLayer
from ucf.files import atomic_path, check_outputs, read_npz
from ucf.flags import (HelpFormatter, add_device_flag, add_resume_flag, fraction, nonnegative_float, nonnegative_int,
                       positive_float, positive_int, use_device)
from ucf.packed_hdf5 import PackedFile
from ucf.provenance import extraction_of, make_provenance, parse_provenance, provenance_text
from ucf.results import TOPK, Results, format_accuracy, topk_accuracies
from ucf.streams import StreamPath, add_stream_flag, add_stream_input, apply_stream
from ucf.runcontrol import (INPUT_PREFIX, PlainLines, RunRecord, check_memory, exit_on_user_error, rate_eta_extension,
                            resume_trainer, stop_on_divergence)

matplotlib.use('Agg')

# Settings a resumed run may change: where it runs and what it writes, not what it computes. A longer --epoch
# continues the same run further.
FREE_ON_RESUME = {'resume', 'device', 'epoch', 'max_iterations', 'in_memory', 'out', 'model_out', 'results', 'train',
                  'test', 'flow_train', 'flow_test'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group('data')
    add_stream_flag(data)
    add_stream_input(data, '--train', 'train1024_norm.hdf5', 'normalised training features')
    add_stream_input(data, '--test', 'test1024_norm.hdf5', 'normalised test features')
    data.add_argument('--in-memory', action='store_true', help='load all features into memory (small sets only)')
    model = p.add_argument_group('model')
    model.add_argument('--hidden', type=positive_int, default=512, help='LSTM units per layer')
    model.add_argument('--lstm-layers', type=positive_int, default=1, help='stacked LSTM layers')
    model.add_argument('--fc', type=positive_int, default=512, help='width of the Linear + sigmoid layer')
    model.add_argument('--dropout', type=fraction, default=0.0, help='dropout ratio on the LSTM inputs and outputs')
    model.add_argument('--batchnorm', action='store_true', help='batch normalisation of the LSTM output')
    optimisation = p.add_argument_group('optimisation')
    optimisation.add_argument('--epoch', '-e', type=positive_int, default=20, help='passes over the training clips')
    optimisation.add_argument('--max-iterations', type=nonnegative_int, default=0,
                              help='stop after this many updates of the batch, whatever --epoch says (quick trials; '
                                   '0: off)')
    optimisation.add_argument('--batchsize', '-b', type=positive_int, default=32, help='sequences per batch')
    optimisation.add_argument('--optimizer', default='adam', choices=('adam', 'sgd', 'momentum'), help='update rule')
    optimisation.add_argument('--lr', type=positive_float, default=0.001, help='learning rate (Adam: alpha)')
    optimisation.add_argument('--momentum', type=fraction, default=0.9, help='momentum of --optimizer momentum')
    optimisation.add_argument('--weight-decay', type=nonnegative_float, default=0.0, help='L2 weight decay')
    optimisation.add_argument('--grad-clip', type=nonnegative_float, default=0.0,
                              help='clip the gradient norm to this (0: off)')
    optimisation.add_argument('--seqlen', type=positive_int, default=120, help='frames per training sequence')
    optimisation.add_argument('--bptt', type=positive_int, default=30,
                              help='truncated back-propagation length: an update every this many steps')
    optimisation.add_argument('--padding', default='reverse', choices=list(PADDING),
                              help='how a clip shorter than --seqlen is made long enough (training, and test '
                                   'segments): ' + '; '.join(f'{k}: {v}' for k, v in PADDING.items()))
    optimisation.add_argument('--variable-length', type=nonnegative_int, default=0, metavar='MIN',
                              help='train each batch on a random length between MIN and --seqlen (0: off)')
    optimisation.add_argument('--loss-weighting', default='uniform', choices=('uniform', 'linear', 'last'),
                              help="weight of each step's loss: equal, growing toward the end, or the last step only")
    optimisation.add_argument('--seed', type=int, default=0, help='of the weights, the order and the augmentations')
    augmentation = p.add_argument_group('augmentation')
    augmentation.add_argument('--noise', type=nonnegative_float, default=0.0, help='Gaussian noise on the features')
    augmentation.add_argument('--max-stride', type=positive_int, default=1, help='random frame stride up to this')
    inference = p.add_argument_group('inference')
    inference.add_argument('--inference', nargs='+', default=['full', 'segments'], choices=list(INFERENCE),
                           help='test techniques to report (the first one is saved for confusion.py): '
                                + '; '.join(f'{k}: {t.help}' for k, t in INFERENCE.items())
                                + '. Choose full (or segments) to compare with single frames: every frame counts. '
                                'last and weighted (and --loss-weighting last/linear) lean on the last frames, the '
                                'ones a damaged clip loses first (extraction keeps such clips partial and lists them '
                                'in its failures file)')
    inference.add_argument('--segments', type=positive_int, default=5, help='sequences per clip for segments')
    output = p.add_argument_group('output and resume')
    output.add_argument('--out', '-o', default=StreamPath('result_lstm'), help='folder for the log, plots and snapshots')
    output.add_argument('--model-out', default=StreamPath('rnn.model'), help='where the trained weights go')
    output.add_argument('--results', default=StreamPath('lstm_results.npz'),
                        help='per-clip test scores, for confusion.py')
    add_resume_flag(output)
    add_device_flag(output)
    args = apply_stream(p.parse_args(argv))
    if args.variable_length > args.seqlen:
        p.error(f'--variable-length {args.variable_length} is longer than --seqlen {args.seqlen}')
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: clips read from the HDF5 file one at a time (memory stays small at full scale unless --in-memory)
# ----------------------------------------------------------------------------------------------------------

def open_features(path, subset, split=None, in_memory=False, stream=None):
    """A packed file of (normalised) features for the LSTM; raw features are taken with a note."""
    clips = PackedFile(path, kind=('normalized features', 'features'), subset=subset, split=split, finite=True,
                       in_memory=in_memory, stream=stream)
    if clips.kind == 'features':
        print(f'NOTE: {path} is not normalised (run normalizeData.py); the LSTM learns badly on raw fc7',
              file=sys.stderr)
    return clips


def open_inputs(args):
    """(training, test) features of --stream: one stream's packed files, each pair from one extraction; for
    two-stream, the rgb and the flow stream's, joined frame by frame."""
    files = ([('rgb', args.train, args.test), ('flow', args.flow_train, args.flow_test)]
             if args.stream == 'two-stream' else [(args.stream, args.train, args.test)])
    pairs = []
    for stream, train_path, test_path in files:
        train = open_features(train_path, 'train', in_memory=args.in_memory, stream=stream)
        test = open_features(test_path, 'test', split=train.split, in_memory=args.in_memory, stream=stream)
        train.check_together(test, 'pack and normalise both from one extraction')
        pairs.append((train, test))
    if len(pairs) == 1:
        return pairs[0]
    return JoinedFeatures(*(p[0] for p in pairs)), JoinedFeatures(*(p[1] for p in pairs))


class JoinedFeatures:
    """Two streams' packed features of a subset side by side: frame t of a clip is the rgb stream's feature of
    frame t, then the flow stream's (whose input for frame t is the stack that starts there). The clips both
    streams hold, with the same frame counts (checked here); a clip one of them left out is left out."""

    def __init__(self, rgb, flow):
        rgb.check_aligned(flow, only_common=True)
        where = {name: i for i, name in enumerate(flow.names)}
        self.parts, self.rows = (rgb, flow), [(i, where[n]) for i, n in enumerate(rgb.names) if n in where]
        self.names = [rgb.names[i] for i, _ in self.rows]
        self.labels = rgb.labels[[i for i, _ in self.rows]]
        self.classes, self.split, self.dim = rgb.classes, rgb.split, rgb.dim + flow.dim
        self.left_out = sorted(set(rgb.left_out) | set(flow.left_out) | (set(rgb.names) ^ set(flow.names)))
        self.record = dict(rgb=rgb.record, flow=flow.record)

    def __len__(self):
        return len(self.rows)

    def read(self, i):
        return np.concatenate([part.read(j) for part, j in zip(self.parts, self.rows[i])], axis=1)

    def lengths(self):
        return self.parts[0].lengths()[[i for i, _ in self.rows]]


def training_sequence(x, length, rng, max_stride=1, noise=0.0, padding='reverse'):
    """A random segment of `length` frames (every stride-th frame, stride drawn from 1..max_stride when the
    clip is long enough), or the whole clip padded by the --padding rule if it is shorter; plus Gaussian noise."""
    n = len(x)
    strides = [s for s in range(1, max_stride + 1) if n >= length * s] or [1]
    stride = strides[rng.randint(len(strides))]
    if n >= length * stride:
        start = rng.randint(0, n - length * stride + 1)
        x = x[start:start + length * stride:stride]
    else:
        x = pad_sequence(x, length, padding)
    if noise:
        x = x + rng.normal(0, noise, x.shape).astype(np.float32)
    return x


class SequenceDataset(chainer.dataset.DatasetMixin):

    def __init__(self, clips, length, max_stride=1, noise=0.0, seed=0, padding='reverse'):
        self.clips, self.length, self.max_stride, self.noise = clips, length, max_stride, noise
        self.padding, self.rng = padding, np.random.RandomState(seed)

    def __len__(self):
        return len(self.clips)

    def get_example(self, i):
        x = training_sequence(self.clips.read(i), self.length, self.rng, self.max_stride, self.noise,
                              self.padding)
        return x.astype(np.float32), self.clips.labels[i]


@chainer.dataset.converter()
def crop_to_shortest(batch, device=None):
    """Chainer's converter, after cutting every sequence to the batch's shortest (--padding crop leaves short
    clips unpadded; with any other rule all are --seqlen long and nothing is cut)."""
    steps = min(len(x) for x, _ in batch)
    return chainer.dataset.concat_examples([(x[:steps], t) for x, t in batch], device)


def segment_starts(n, length, count):
    """`count` start frames of `length`-frame segments spread evenly over a clip of n frames."""
    if n <= length:
        return [0]
    return sorted(set(np.linspace(0, n - length, count).round().astype(int).tolist()))


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class RNN(chainer.Chain):
    """Stacked LSTM -> Linear + sigmoid -> Linear, over (batch, time, features), carrying its state between
    calls until reset_state(). Each layer of a chunk is one LSTMLayer (upward: its input weight and bias,
    lateral: its recurrent weight, F.lstm's gate layout)."""

    def __init__(self, n_in=1024, n_hidden=512, n_layers=1, n_fc=512, n_classes=101, dropout=0.0,
                 batchnorm=False):
        super().__init__()
        self.n_hidden, self.n_layers, self.dropout, self.batchnorm = n_hidden, n_layers, dropout, batchnorm
        with self.init_scope():
            self.upward = chainer.ChainList(*[L.Linear(n_in if i == 0 else n_hidden, 4 * n_hidden)
                                              for i in range(n_layers)])
            self.lateral = chainer.ChainList(*[L.Linear(n_hidden, 4 * n_hidden, nobias=True)
                                               for _ in range(n_layers)])
            if batchnorm:
                self.bn = L.BatchNormalization(n_hidden)
            self.fc = L.Linear(n_hidden, n_fc)
            self.out = L.Linear(n_fc, n_classes)
        # Forget gates start open (bias 1), the usual remedy for early vanishing gradients.
        for up in self.upward:
            up.b.array.reshape(n_hidden, 4)[:, 2] = 1.0
        self.reset_state()

    def reset_state(self):
        self.state = [(None, None)] * self.n_layers

    def forward(self, x, projected=None):
        """x: (batch, time, n_in) -> class scores (batch, time, n_classes). In inference, `projected` instead of x:
        the first layer's input projections, time-major (time, batch, 4 hidden) as project_frames() gives them
        (consumed), so that a frame seen by several sequences (segments, techniques) is projected once."""
        if projected is None:
            batch, steps = x.shape[:2]
            h_seq = F.transpose(x, (1, 0, 2))  # time-major inside: each step's rows are contiguous
        else:
            steps, batch = projected.shape[:2]
        for layer in range(self.n_layers):
            c, h = self.state[layer]
            if c is None:
                c = h = self.xp.zeros((batch, self.n_hidden), np.float32)
            if layer == 0 and projected is not None:
                h_seq, c, h = LSTMLayer(projected=True).apply((projected, self.lateral[0].W, c, h))
            else:
                inputs = F.dropout(h_seq, self.dropout) if self.dropout else h_seq
                h_seq, c, h = LSTMLayer().apply((inputs, self.upward[layer].W, self.upward[layer].b,
                                                 self.lateral[layer].W, c, h))
            self.state[layer] = (c, h)
        h = F.reshape(h_seq, (steps * batch, self.n_hidden))
        if self.dropout:
            h = F.dropout(h, self.dropout)
        if self.batchnorm:
            h = self.bn(h)
        y = self.out(ExpSigmoid().apply((self.fc(h),))[0])
        return F.transpose(F.reshape(y, (steps, batch, -1)), (1, 0, 2))

    def project_frames(self, frames):
        """The first layer's input projection of frames (N, n_in), for forward(projected=...)."""
        up = self.upward[0]
        return LSTMLayer.project(self.xp.asarray(frames), up.W.array, up.b.array)


def save_model(model, path, record, classes):
    """rnn.model: the weights (Chainer's names), the class names and the record of what made it, atomically."""
    weights = chainer.serializers.DictionarySerializer()
    weights.save(model)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, provenance=np.array(record), classes=np.array(classes), **weights.target)


def load_model(path):
    """(RNN, record, class names or None for a file from before they were saved) of an rnn.model, its shape read
    from its weights; DataError naming the file when it is missing or not one."""
    stored = read_npz(path, 'LSTM weights', 'rnn.py writes them (Part 3).')
    layers = sum(1 for k in stored if k.startswith('upward/') and k.endswith('/W'))
    if not layers or 'fc/W' not in stored or 'out/W' not in stored:
        raise DataError(f'{path} holds no LSTM weights (upward/0/W, fc/W, out/W): not an rnn.model of rnn.py')
    hidden, n_in = stored['lateral/0/W'].shape[1], stored['upward/0/W'].shape[1]
    model = RNN(n_in, hidden, layers, stored['fc/W'].shape[0], stored['out/W'].shape[0],
                batchnorm='bn/gamma' in stored)
    chainer.serializers.NpzDeserializer(stored).load(model)
    classes = [str(c) for c in stored['classes']] if 'classes' in stored else None
    return model, parse_provenance(stored['provenance'][()] if 'provenance' in stored else None), classes


# ----------------------------------------------------------------------------------------------------------
# Training: truncated BPTT, the optimiser, the trainer
# ----------------------------------------------------------------------------------------------------------

def loss_weights(steps, mode, xp=np):
    """Per-step loss weights with mean 1: 'uniform', 'linear' (growing toward the end) or 'last' (last step)."""
    if mode == 'uniform':
        w = np.ones(steps)
    elif mode == 'linear':
        w = np.arange(1, steps + 1, dtype=np.float64)
    elif mode == 'last':
        w = np.zeros(steps)
        w[-1] = 1
    else:
        raise ValueError(f'unknown loss weighting {mode!r}')
    return xp.asarray(w / w.mean(), np.float32)


class BPTTUpdater(training.updaters.StandardUpdater):
    """Truncated back-propagation through time: every `bptt` steps, backward, cut the graph, update."""

    def __init__(self, iterator, optimizer, device, bptt, loss_weighting='uniform', min_length=None, seed=0):
        super().__init__(iterator, optimizer, device=device, converter=crop_to_shortest)
        self.bptt, self.loss_weighting, self.min_length = bptt, loss_weighting, min_length
        self.rng = np.random.RandomState(seed)

    def update_core(self):
        batch = self.get_iterator('main').next()
        x, t = self.converter(batch, self.device)
        optimizer = self.get_optimizer('main')
        model = optimizer.target
        steps = x.shape[1]
        if self.min_length:  # variable-length training: a random length for this batch
            steps = self.rng.randint(min(self.min_length, steps), steps + 1)
            x = x[:, :steps]
        weights = loss_weights(steps, self.loss_weighting)
        model.reset_state()
        total, y = 0.0, None
        for start in range(0, steps, self.bptt):
            end = min(start + self.bptt, steps)
            chunk_weight = float(weights[start:end].sum())
            if not chunk_weight:  # no step of this chunk counts ('last'): run it only to carry the state on
                with chainer.no_backprop_mode():
                    y = model(x[:, start:end])
                continue
            y = model(x[:, start:end])
            chunk = end - start
            losses = F.softmax_cross_entropy(F.reshape(y, (-1, y.shape[2])), model.xp.repeat(t, chunk),
                                             reduce='no')
            step_weights = model.xp.tile(model.xp.asarray(weights[start:end]), len(t))
            weighted = F.sum(losses * step_weights)
            # Each update is the weighted mean of its own chunk's losses, so the learning rate means what the flag
            # says whatever the number of chunks (it used to be divided among them).
            loss = weighted / (len(t) * chunk_weight)
            model.cleargrads()
            loss.backward()
            loss.unchain_backward()
            optimizer.update()
            total += float(weighted.array)
        # reported: the weighted mean loss over the whole sequence, as before
        chainer.report({'loss': total / (len(t) * float(weights.sum())), 'accuracy': F.accuracy(y[:, -1], t)},
                       model)


def make_optimizer(args):
    if args.optimizer == 'adam':
        optimizer = LeanAdam(alpha=args.lr)
    elif args.optimizer == 'momentum':
        optimizer = chainer.optimizers.MomentumSGD(lr=args.lr, momentum=args.momentum)
    else:
        optimizer = chainer.optimizers.SGD(lr=args.lr)
    return optimizer


def report_padding(args, train, test):
    """Say how many sequences the --padding rule makes up frames for: at --seqlen 64 half of a set of 40-150-frame
    clips is padded, which is not a detail."""
    short = [int((clips.lengths() < args.seqlen).sum()) for clips in (train, test)]
    padded = [t for t in args.inference if INFERENCE[t].pads]
    which = f' (their [{", ".join(padded)}] sequences)' if padded else ' (no technique pads them)'
    print(f'padding (--padding {args.padding}: {PADDING[args.padding]}): {short[0]} of {len(train)} training clips '
          f'are shorter than --seqlen {args.seqlen}, and {short[1]} of {len(test)} test clips{which}',
          file=sys.stderr)


def memory_needed(args, n_in, n_classes):
    """{what: bytes}, a lower bound of what training holds at once (for check_memory): the weights with their
    gradients and Adam's two moments, and a batch's sequences through every layer with their gradients."""
    layers = [(n_in if i == 0 else args.hidden, args.hidden) for i in range(args.lstm_layers)]
    params = sum(4 * h * (i + h + 1) for i, h in layers) + (args.hidden + 1) * args.fc + (args.fc + 1) * n_classes
    per_frame = n_in + args.lstm_layers * 6 * args.hidden + args.fc + n_classes  # gates, cell, output; fc; scores
    return {'the weights, gradients and Adam moments (--hidden, --lstm-layers, --fc)': 16 * params,
            f'{args.batchsize} sequences of {args.seqlen} frames (--batchsize, --seqlen) through the network':
                8 * args.batchsize * args.seqlen * per_frame}


def make_trainer(args):
    train, test = open_inputs(args)
    check_memory(memory_needed(args, train.dim, len(train.classes)), args.device,
                 'lower the flags named above')
    np.random.seed(args.seed)
    model = RNN(train.dim, args.hidden, args.lstm_layers, args.fc, len(train.classes), args.dropout, args.batchnorm)
    device = use_device(model, args.device)
    optimizer = make_optimizer(args)
    optimizer.setup(model)
    if args.weight_decay:
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(args.weight_decay))
    if args.grad_clip:
        optimizer.add_hook(chainer.optimizer_hooks.GradientClipping(args.grad_clip))

    dataset = SequenceDataset(train, args.seqlen, args.max_stride, args.noise, args.seed, args.padding)
    report_padding(args, train, test)
    if test.left_out:
        warn(f'{args.test} leaves out {len(test.left_out)} test clips that normalizeData.py found NaN or inf in '
             f'(e.g. {", ".join(test.left_out[:3])}): the LSTM is scored on {len(test)} clips, single-frame results '
             'on all of them; confusion.py compares the clips both scored')
    order_stream = np.random.RandomState(args.seed)
    iterator = chainer.iterators.SerialIterator(
        dataset, args.batchsize, order_sampler=chainer.iterators.ShuffleOrderSampler(order_stream))
    updater = BPTTUpdater(iterator, optimizer, device, args.bptt, args.loss_weighting, args.variable_length,
                          args.seed)
    stop = (args.max_iterations, 'iteration') if args.max_iterations else (args.epoch, 'epoch')
    trainer = training.Trainer(updater, stop, out=args.out)
    tester = evaluation_extension(model, test, args.inference, args.seqlen, args.segments, args.batchsize,
                                  args.padding)
    trainer.extend(tester)
    trainer.extend(extensions.LogReport(trigger=(1, 'epoch')))
    first = args.inference[0]
    trainer.extend(extensions.PrintReport(['epoch', 'iteration', 'main/loss', 'main/accuracy',
                                           f'test/{first}/top1', f'test/{first}/top5', f'test/{first}/top10',
                                           'elapsed_time'], out=PlainLines()))
    epochs_end = -(-args.epoch * len(train) // args.batchsize)  # batches run on across epochs: ceil(E n / b)
    iterations = min(epochs_end, args.max_iterations or epochs_end)

    def evaluation_time(trainer):  # spent so far, and still to come: one evaluation per epoch left
        epochs = -(-iterations * args.batchsize // len(train))  # the epochs the run will reach
        return tester.seconds, tester.last_seconds * (epochs - trainer.updater.epoch)
    trainer.extend(rate_eta_extension(iterations, args.batchsize, 'sequences', (10, 'iteration'), evaluation_time))
    trainer.extend(extensions.PlotReport(['main/loss'], 'epoch', file_name='loss.png'))
    trainer.extend(extensions.PlotReport(['main/accuracy'] + [f'test/{t}/top1' for t in args.inference],
                                         'epoch', file_name='accuracy.png'))
    trainer.extend(extensions.snapshot(filename='snapshot_iter_{.updater.iteration}', n_retains=2),
                   trigger=(1, 'epoch'))
    trainer.extend(stop_on_divergence(model, args.out, len(train.classes),
                                      ', or gradient clipping (--grad-clip 5)'))
    settings = {k: v for k, v in vars(args).items() if k not in FREE_ON_RESUME}
    # other features at the same path: another extraction (two-stream: the tags of both)
    tags = [(extraction_of(r) or {}).get('tag') for r in (train.record.values() if args.stream == 'two-stream'
                                                          else [train.record])]
    settings[INPUT_PREFIX + 'the features of extraction'] = tags if len(tags) > 1 else tags[0]
    settings[INPUT_PREFIX + 'the feature size'] = train.dim
    trainer.extend(RunRecord(settings, dict(order=order_stream, numpy=np.random, sequences=dataset.rng,
                                            lengths=updater.rng)))
    resume_trainer(trainer, args.out, args.resume)
    return trainer, model, train, test, tester


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the --inference techniques on the test clips
# ----------------------------------------------------------------------------------------------------------

# Steps per forward call in inference: it bounds memory only (the state carries over), results do not depend on it.
INFERENCE_CHUNK = 120


def step_log_probs(model, sequences, chunk=INFERENCE_CHUNK):
    """Log softmax at every step of each sequence (list of frames x dims arrays, any lengths)."""
    return projected_log_probs(model, [(model.project_frames(s), np.arange(len(s))) for s in sequences], chunk)


def projected_log_probs(model, sequences, chunk=INFERENCE_CHUNK):
    """Log softmax at every step of each sequence, run in one padded batch (the LSTM is causal, so the padding
    after a sequence's end cannot change its earlier steps). A sequence is (projections, rows): the first layer's
    input projections of a clip's frames (model.project_frames) and the sequence's frames as row numbers into
    them, so that overlapping segments and padded repeats of a clip share one projection of each frame."""
    lengths = [len(rows) for _, rows in sequences]
    width = sequences[0][0].shape[1]
    xp = model.xp
    model.reset_state()
    outputs = []
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, max(lengths), chunk):
            end = min(start + chunk, max(lengths))
            gates = xp.zeros((end - start, len(sequences), width), np.float32)
            for j, (projections, rows) in enumerate(sequences):
                rows = rows[start:end]
                gates[:len(rows), j] = projections[xp.asarray(rows)]
            y = F.log_softmax(F.reshape(model(None, projected=gates), (-1, model.out.W.shape[0])))
            outputs.append(chainer.backends.cuda.to_cpu(y.array).reshape(len(sequences), end - start, -1))
    y = np.concatenate(outputs, axis=1)
    return [y[i, :n] for i, n in enumerate(lengths)]


def sequence_scores(model, features, techniques, seqlen, segments=5, padding='reverse', chunk=INFERENCE_CHUNK):
    """({technique: scores}, the log softmax at every step) of one sequence of features (frames x dims: a memory
    map will do), scored as evaluate() scores a clip, but read `chunk` frames at a time with the LSTM's state
    carried over: a video of any length in memory bounded by the chunk (and by its steps' log softmax, frames x
    classes). The other techniques' sequences are read as they name them."""
    n, xp = len(features), model.xp
    steps = []
    model.reset_state()
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, n, chunk):
            gates = model.project_frames(np.asarray(features[start:start + chunk]))[:, None]  # time, batch 1
            y = F.log_softmax(F.reshape(model(None, projected=xp.ascontiguousarray(gates)),
                                        (-1, model.out.W.shape[0])))
            steps.append(chainer.backends.cuda.to_cpu(y.array))
    whole = np.concatenate(steps)
    scores = {}
    for t in techniques:
        technique = INFERENCE[t]
        if technique.sequences is whole_clip:  # the pass above
            scores[t] = technique.score([whole])
        else:
            rows = technique.sequences(n, seqlen, segments, padding)
            scores[t] = technique.score(step_log_probs(model, [np.asarray(features[r]) for r in rows]))
    return scores, whole


def whole_clip(n, seqlen, segments, padding):
    """The frames a whole-clip technique runs over: the clip, once (no padding)."""
    return [np.arange(n)]


def spread_segments(n, seqlen, segments, padding):
    """--segments sequences of --seqlen frames spread over the clip; a shorter clip padded by the --padding rule."""
    return [pad_sequence(np.arange(start, min(start + seqlen, n)), seqlen, padding)
            for start in segment_starts(n, seqlen, segments)]


def weighted_steps(weighting):
    """A clip's scores from its one sequence: the steps' log softmax weighted as the training loss weighs them."""
    def score(log_probs):
        weights = loss_weights(len(log_probs[0]), weighting)
        return (log_probs[0] * weights[:, None]).mean(axis=0)
    return score


def mean_of_sequences(log_probs):
    """A clip's scores from its sequences: each one's mean log softmax, averaged."""
    return np.stack([lp.mean(axis=0) for lp in log_probs]).mean(axis=0)


# An inference technique: the sequences it runs over a clip (frame rows, from the clip's length and the flags), how
# it scores the clip from their per-step log softmax, whether it pads short clips (--padding), and what it is (for
# --help). Techniques that run the same sequences share one pass of the LSTM; adding a technique is adding an entry.
Technique = collections.namedtuple('Technique', 'sequences score pads help')
INFERENCE = {
    'full': Technique(whole_clip, weighted_steps('uniform'), False,
                      'the whole clip in one pass, log softmax averaged over all steps'),
    'last': Technique(whole_clip, weighted_steps('last'), False, 'the whole clip, the last step only'),
    'weighted': Technique(whole_clip, weighted_steps('linear'), False,
                          'the whole clip, steps weighted linearly toward the end'),
    'segments': Technique(spread_segments, mean_of_sequences, True,
                          '--segments sequences of --seqlen frames spread over the clip, their scores averaged'),
}


def evaluate(model, clips, techniques, seqlen, segments=5, batchsize=32, padding='reverse'):
    """{technique: scores (clips x classes)} on every clip of `clips` by the INFERENCE techniques named, in
    batches of similar lengths."""
    lengths = clips.lengths()
    order = np.argsort(lengths, kind='stable')
    n_classes = model.out.W.shape[0]
    scores = {t: np.zeros((len(clips), n_classes), np.float32) for t in techniques}
    passes = {}  # the techniques of each kind of sequences, run together
    for t in techniques:
        passes.setdefault(INFERENCE[t].sequences, []).append(t)
    for b in range(0, len(order), batchsize):
        index = order[b:b + batchsize]
        features = [clips.read(i) for i in index]
        # every frame of the batch's clips through the first layer's input weights once, in one product
        projected = model.project_frames(np.concatenate(features))
        bounds = np.cumsum([0] + [len(x) for x in features])
        clip_projections = [projected[bounds[k]:bounds[k + 1]] for k in range(len(index))]
        for sequences, named in passes.items():
            rows = [sequences(len(p), seqlen, segments, padding) for p in clip_projections]
            log_probs = iter(projected_log_probs(model, [(p, r) for p, clip_rows in zip(clip_projections, rows)
                                                         for r in clip_rows]))
            for i, clip_rows in zip(index, rows):
                own = [next(log_probs) for _ in clip_rows]
                for t in named:
                    scores[t][i] = INFERENCE[t].score(own)
    return scores


def evaluation_extension(model, clips, techniques, seqlen, segments, batchsize, padding='reverse'):
    """Each epoch: test top-1/5/10 of every inference technique, reported and printed in the handout's form."""
    @training.make_extension(trigger=(1, 'epoch'), priority=training.PRIORITY_WRITER)
    def run_test(trainer):
        started = time.time()
        scores = evaluate(model, clips, techniques, seqlen, segments, batchsize, padding)
        observation = {}
        for technique in techniques:
            accuracies = topk_accuracies(clips.labels, scores[technique])
            for k, a in zip(TOPK, accuracies):
                observation[f'test/{technique}/top{k}'] = a
            print(f'epoch {trainer.updater.epoch} test [{technique}] {format_accuracy(accuracies)}', flush=True)
        chainer.report(observation)
        run_test.last_scores, run_test.iteration = scores, trainer.updater.iteration
        run_test.last_seconds = time.time() - started
        run_test.seconds += run_test.last_seconds
    run_test.last_scores, run_test.iteration, run_test.last_seconds, run_test.seconds = None, None, 0.0, 0.0
    return run_test


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        check_outputs({'--train': args.train, '--test': args.test},
                      {'--model-out': args.model_out, '--results': args.results}, {'--out': args.out})
        trainer, model, train, test, tester = make_trainer(args)
        trainer.run(show_loop_exception_msg=False)
        if tester.iteration == trainer.updater.iteration:  # evaluated after the last update already
            scores = tester.last_scores
        else:  # stopped between epochs (--max-iterations): evaluate the final weights
            scores = evaluate(model, test, args.inference, args.seqlen, args.segments, args.batchsize,
                              args.padding)
        model.to_cpu()
        record = provenance_text(make_provenance('rnn.py', train=train.record, test=test.record,
                                                 options=vars(args)))
        save_model(model, args.model_out, record, test.classes)
        Results(test.names, test.labels, scores[args.inference[0]], test.classes, split=test.split, model='lstm',
                stream=args.stream, inference=args.inference[0], provenance=record).save(args.results)
    final = {t: topk_accuracies(test.labels, scores[t]) for t in args.inference}
    for t in args.inference:
        print(f'final test [{t}] {format_accuracy(final[t])}')
    missing = f'; {len(test.left_out)} left out by normalizeData.py' if test.left_out else ''
    print(f'wrote {args.model_out} (the weights) and {args.results} ({len(test.labels)} test clips scored by '
          f'[{args.inference[0]}]{missing}, for confusion.py); log and curves in {args.out}/', file=sys.stderr)
    return final, trainer.observation


if __name__ == '__main__':
    main()
