"""Part 1: fine-tune ImageNet VGG16 into VGGNet_1024 on random single frames of the UCF-101 training clips.

    python frameBasedTrain.py --data UCF-101 --lists ucfTrainTestlist --split 1 --device 0

Each epoch draws one random frame (randomly flipped by default) from every training clip. As in the handout only
fc7 and fc8 learn (--train-from); the result is written to VGG_1024.model. A snapshot is taken every epoch in
--out; `--resume auto` continues from the newest one after a kill or a walltime limit.

    python frameBasedTrain.py --stream flow --device 0      # the motion stream: VGG_1024_flow.model

The flow stream's examples are stacks of L optical flow fields at a random frame (ucf/flow.py), computed from the
decoded frames in the loader processes; its VGG16 takes 2L channels, conv1_1 initialised from the ImageNet
filters averaged over colour (cross-modality initialisation); all layers learn and dropout is 0.7 by default.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import functools
import sys

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import matplotlib
import numpy as np
from chainer import training
from chainer.training import extensions

import VGGNet
import VGGNet_1024
from helperFunctions import check_clips_on_disk, random_augmentation, read_class_index, read_split
from ucf.errors import DataError
from ucf.files import check_outputs
from ucf.flags import (HelpFormatter, add_conv_flag, add_data_flags, add_device_flag, add_resume_flag, fraction,
                       nonnegative_float, nonnegative_int, positive_float, positive_int, use_device)
from ucf.flow import add_flow_flags, flow_settings
from ucf.frame_dataset import LoaderIterator, RandomFrameDataset, stop_when_a_loader_fails
from ucf.provenance import make_provenance
from ucf.runcontrol import (INPUT_PREFIX, PlainLines, RunRecord, check_memory, exit_on_user_error,
                            rate_eta_extension, resume_trainer, stop_on_divergence, usable_cpus)
from ucf.streams import NETWORK_STREAMS, StreamPath, add_stream_flag, apply_stream

matplotlib.use('Agg')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group('data')
    add_stream_flag(data, NETWORK_STREAMS)
    add_data_flags(data)
    data.add_argument('--skip-missing', action='store_true', help='go on when listed clips are missing on disk')
    data.add_argument('--loaderjob', '-j', type=nonnegative_int, default=usable_cpus(),
                      help='frame-loading processes (0: load in the training process); the default is the CPUs '
                           'this job may use (its Slurm/PBS cpuset)')
    data.add_argument('--cache-mb', type=nonnegative_int, default=0,
                      help='keep decoded clips (RGB) in memory up to this size, per loading process (small data sets)')
    model = p.add_argument_group('model')
    model.add_argument('--vgg', default='VGG.model', help='ImageNet VGG16 weights (see VGGNet.py)')
    model.add_argument('--train-from', default=None, choices=VGGNet_1024.LAYERS,
                       help='lowest layer that learns; the layers below stay as in VGG.model (None: '
                            + ', '.join(f'{s} {d["train_from"]}' for s, d in STREAM_DEFAULTS.items()) + ')')
    model.add_argument('--feature-size', type=positive_int, default=1024, help='width of the new fc7')
    model.add_argument('--dropout', type=fraction, default=None,
                       help='dropout ratio after fc6 and fc7 (None: '
                            + ', '.join(f'{s} {d["dropout"]}' for s, d in STREAM_DEFAULTS.items()) + ')')
    model.add_argument('--insize', type=positive_int, default=None,
                       help='input side (None: what VGG.model was made for)')
    add_conv_flag(model)
    optimisation = p.add_argument_group('optimisation (MomentumSGD with weight decay)')
    optimisation.add_argument('--batchsize', '-b', type=positive_int, default=36, help='frames per batch')
    optimisation.add_argument('--epoch', '-e', type=positive_int, default=20, help='passes over the training clips')
    optimisation.add_argument('--lr', type=positive_float, default=0.0005, help='learning rate')
    optimisation.add_argument('--momentum', type=fraction, default=0.9, help='momentum')
    optimisation.add_argument('--weight-decay', type=nonnegative_float, default=0.0005, help='L2 weight decay')
    optimisation.add_argument('--seed', type=int, default=0, help='seed of the new layers and the frame order')
    augmentation = p.add_argument_group('augmentation (one random frame of each clip per epoch)')
    augmentation.add_argument('--no-flip', action='store_true', help='turn off random horizontal flips')
    augmentation.add_argument('--crop', action='store_true', help='random crops of 87.5%% of each side')
    augmentation.add_argument('--resize', action='store_true', help='random zoom: crops of 60-100%% of each side')
    augmentation.add_argument('--rotate', action='store_true', help='random rotations of up to 10 degrees')
    add_flow_flags(p.add_argument_group('the flow stream\'s input (--stream flow; recorded in its model)'))
    output = p.add_argument_group('output and resume')
    output.add_argument('--model-out', default=StreamPath('VGG_1024.model'), help='where the fine-tuned weights go')
    output.add_argument('--out', '-o', default=StreamPath('result_frame'),
                        help='folder for the log, plots and snapshots')
    output.add_argument('--test-eval', action='store_true', help='evaluate on the test split every epoch')
    output.add_argument('--log-interval', type=positive_int, default=20, help='iterations between log lines')
    output.add_argument('--snapshot-interval', type=nonnegative_int, default=0,
                        help='iterations between snapshots (0: one per epoch)')
    add_resume_flag(output)
    add_device_flag(output)
    args = apply_stream(p.parse_args(argv))
    for name, value in STREAM_DEFAULTS[args.stream].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.stream == 'flow':
        rgb_only = [f'--{name}' for name in ('crop', 'resize', 'rotate') if getattr(args, name)]
        if rgb_only:
            p.error(f'{", ".join(rgb_only)}: augmentations of RGB frames; a flow stack is only flipped (--no-flip '
                    'turns that off)')
    return args


# What the streams learn by default: the RGB stream keeps ImageNet's convolutions (the handout's fc7 and fc8);
# flow is not what ImageNet's filters saw, so every layer learns, with the heavier dropout that flow networks use
# (0.7, Wang et al. 2016).
STREAM_DEFAULTS = {'rgb': dict(train_from='fc7', dropout=0.5), 'flow': dict(train_from='conv1_1', dropout=0.7)}


# Settings a resumed run may change: where it runs and how it reports, not what it computes. A longer --epoch
# continues the same run further.
FREE_ON_RESUME = {'resume', 'device', 'loaderjob', 'cache_mb', 'log_interval', 'snapshot_interval', 'epoch', 'out',
                  'model_out', 'data', 'lists', 'vgg', 'skip_missing'}


def build_model(args, n_classes, in_channels):
    vgg, provenance = VGGNet.load_vgg(args.vgg, conv=args.conv)
    if args.insize and args.insize != vgg.insize:
        raise DataError(f'{args.vgg}: its fc6 is for {vgg.insize}x{vgg.insize} inputs, but --insize is '
                        f'{args.insize}; leave --insize out to use the weights\' size.')
    check_memory(VGGNet.memory_needed(vgg.insize, vgg.widths, vgg.fc6.W.shape[0], n_classes, args.feature_size,
                                      args.batchsize, training=True, in_channels=in_channels),
                 args.device, 'lower --batchsize or --feature-size')
    model = VGGNet_1024.from_vgg(vgg, n_classes, args.feature_size, args.train_from, seed=args.seed,
                                 dropout=args.dropout, in_channels=in_channels)
    return model, provenance


def make_trainer(args):
    classes = read_class_index(args.lists)
    train_clips = check_clips_on_disk(args.data, read_split(args.lists, args.split, 'train'), args.skip_missing)
    flow = flow_settings(args) if args.stream == 'flow' else None
    model, provenance = build_model(args, len(classes), 2 * flow.stack if flow else 3)
    print(f'{len(train_clips)} training clips, {len(classes)} classes, the {args.stream} stream, VGG16 from '
          f'{provenance["source"]}, learning '
          f'{", ".join(VGGNet_1024.LAYERS[VGGNet_1024.LAYERS.index(args.train_from):])}', file=sys.stderr)
    device = use_device(model, args.device)

    optimizer = chainer.optimizers.MomentumSGD(lr=args.lr, momentum=args.momentum)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(args.weight_decay))
    model.freeze_below_train_from()

    augment = functools.partial(random_augmentation, flip=not args.no_flip, crop=args.crop, resize=args.resize,
                                rotate=args.rotate)
    train = RandomFrameDataset(args.data, train_clips, model.insize, augment=augment, cache_mb=args.cache_mb,
                               seed=args.seed, class_names=classes, flow=flow)
    train.probe()
    example_bytes = 4 * model.in_channels * model.insize ** 2 + 64
    order_stream = np.random.RandomState(args.seed)
    order = chainer.iterators.ShuffleOrderSampler(order_stream)
    if args.loaderjob > 0:
        stop_when_a_loader_fails()
        train_iter = LoaderIterator(train, args.batchsize, n_processes=args.loaderjob,
                                    shared_mem=example_bytes, order_sampler=order)
    else:
        train_iter = chainer.iterators.SerialIterator(train, args.batchsize, order_sampler=order)
    updater = training.updaters.StandardUpdater(train_iter, optimizer, device=device)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    if args.test_eval:
        test_clips = check_clips_on_disk(args.data, read_split(args.lists, args.split, 'test'), args.skip_missing)
        test = RandomFrameDataset(args.data, test_clips, model.insize, train=False, cache_mb=args.cache_mb,
                                  class_names=classes, flow=flow)
        test_iter = chainer.iterators.SerialIterator(test, args.batchsize, repeat=False, shuffle=False)
        trainer.extend(extensions.Evaluator(test_iter, model, device=device), trigger=(1, 'epoch'))

    log_interval = (args.log_interval, 'iteration')
    # batches run on across epochs (an epoch's last batch is topped up from the next), so E epochs take
    # ceil(E n / b) iterations, not E ceil(n / b)
    iterations = -(-args.epoch * len(train) // args.batchsize)
    trainer.extend(extensions.LogReport(trigger=log_interval))
    entries = ['epoch', 'iteration', 'main/loss', 'main/accuracy', 'validation/main/loss',
               'validation/main/accuracy', 'lr', 'elapsed_time']
    trainer.extend(extensions.observe_lr(), trigger=log_interval)
    trainer.extend(extensions.PrintReport(entries, out=PlainLines()), trigger=log_interval)
    trainer.extend(rate_eta_extension(iterations, args.batchsize, 'frames', log_interval))
    trainer.extend(extensions.PlotReport(['main/loss', 'validation/main/loss'], 'iteration', log_interval,
                                         file_name='loss.png'))
    trainer.extend(extensions.PlotReport(['main/accuracy', 'validation/main/accuracy'], 'iteration', log_interval,
                                         file_name='accuracy.png'))
    snapshot_trigger = (args.snapshot_interval, 'iteration') if args.snapshot_interval else (1, 'epoch')
    trainer.extend(extensions.snapshot(filename='snapshot_iter_{.updater.iteration}', n_retains=2),
                   trigger=snapshot_trigger)
    trainer.extend(stop_on_divergence(model, args.out, len(classes),
                                      ', or fewer layers that learn (--train-from fc7)'))
    # The frames' random stream is the training process's only with --loaderjob 0; loaders fork their own.
    settings = {k: v for k, v in vars(args).items() if k not in FREE_ON_RESUME}
    settings[INPUT_PREFIX + 'the VGG16 weights'] = provenance.get('digest')  # another VGG.model at the same path
    trainer.extend(RunRecord(settings, dict(order=order_stream, numpy=np.random, frames=train.rng)))

    resume_trainer(trainer, args.out, args.resume)
    return trainer, model, provenance, flow


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        check_outputs({'--vgg': args.vgg}, {'--model-out': args.model_out}, {'--out': args.out})  # not an epoch later
        trainer, model, vgg, flow = make_trainer(args)
        trainer.run(show_loop_exception_msg=False)
        model.to_cpu()
        VGGNet.save_model(model, args.model_out, make_provenance(
            'frameBasedTrain.py', split=args.split, insize=model.insize, vgg=vgg, options=vars(args),
            classes=read_class_index(args.lists), **(dict(stream='flow', flow=flow._asdict()) if flow else {})))
    print(f'wrote {args.model_out}; log, loss.png and accuracy.png in {args.out}/', file=sys.stderr)


if __name__ == '__main__':
    main()
