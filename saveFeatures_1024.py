"""Part 2: the 1024-d fc7 feature and the softmax of every frame of every clip, one shard of the work.

    python saveFeatures_1024.py --shard 3 --num-shards 12 --device 0

writes UCF-101_features/<Class>/<clip>.npy (frames x 1024) and UCF-101_framePrediction/<Class>/<clip>.npy
(frames x classes), float32, for the train and test clips of the split that fall in shard 3 of 12. Shards split
the clips by frame count (read from the AVI headers), so 12 jobs take about equally long.

Every file is written under a temporary name and renamed when whole, so a job killed at its walltime leaves
nothing half-written; a rerun skips the clips that are done. A clip that cannot be decoded is skipped; one that
is cut short (its container promises more than it holds) or whose packets do not all decode is kept with the
frames that did; both are listed with the reason in extraction_logs/failures_shard_KK_of_NN.tsv. The decoder
yields every frame it can; the last frame of a UCF-101 clip is often broken, so one frame short of the packets a
file holds is expected and not reported.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import contextlib
import functools
import json
import os
import queue
import re
import sys
import threading
import time

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import numpy as np

import VGGNet
import VGGNet_1024
from helperFunctions import check_clips_on_disk, read_class_index, read_split
from ucf.errors import DataError, warn
from ucf.extraction import ExtractionStore, FailureLog
from ucf.files import atomic_path
from ucf.flow import FLOW_PREPROCESSING, FlowSettings
from ucf.flags import (HelpFormatter, add_conv_flag, add_data_flags, add_device_flag, add_output_folder_flags,
                       nonnegative_int, output_folders, positive_int, use_device)
from ucf.preprocessing import PREPROCESSING
from ucf.provenance import make_provenance
from ucf.runcontrol import Progress, check_memory, exit_on_user_error
from ucf.streams import NETWORK_STREAMS, STREAM_INPUTS, StreamPath, add_stream_flag, apply_stream
from ucf.video import VideoError, header_frame_count, video_info


def split_clips(data_root, lists, split, subsets=('train', 'test'), skip_missing=False):
    """All clips of the split, sorted by path, so that every shard job sees the same list."""
    clips = []
    for subset in subsets:
        clips += read_split(lists, split, subset)
    return sorted(check_clips_on_disk(data_root, clips, skip_missing))


def shard_ranges(weights, num_shards):
    """Contiguous [start, end) ranges of items with about equal total weight (every item lands in one range)."""
    cumulative = np.cumsum(np.maximum(np.asarray(weights, np.float64), 1))
    bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, num_shards) / num_shards, side='right')
    edges = [0, *bounds.tolist(), len(weights)]
    return [(edges[k], edges[k + 1]) for k in range(num_shards)]


def extraction_record(args, model):
    """What makes this extraction's outputs what they are; its tag (a digest of the model's weights, the split,
    the input size and the preprocessing, and for the flow stream its input's settings) names it in the manifest.
    Refuses a model fine-tuned on another split."""
    import hashlib
    source = model.provenance
    trained_on = source.get('split')
    if trained_on is None:  # a model file from before provenance records: its old note says the split
        match = re.search(r'split=(\d)', source.get('source', ''))
        trained_on = int(match.group(1)) if match else None
    if trained_on is not None and trained_on != args.split and not args.allow_other_split:
        raise DataError(f'{args.model} was fine-tuned on split {trained_on}, whose training clips include the test '
                        f'clips of split {args.split}: its features would inflate every accuracy. Fine-tune on split '
                        f'{args.split} (frameBasedTrain.py --split {args.split}), or pass --allow-other-split')
    if trained_on is None:
        warn(f'{args.model} records no split: cannot check that it never saw the test clips of split {args.split}')
    identity = [source['digest'], args.split, model.insize, PREPROCESSING]
    stream = {}
    if model.stream == 'flow':  # the input is the model's own: the settings it was fine-tuned with
        stream = dict(stream='flow', flow=model.flow, flow_preprocessing=FLOW_PREPROCESSING)
        identity += ['flow', model.flow, FLOW_PREPROCESSING]
    record = make_provenance('saveFeatures_1024.py', split=args.split, insize=model.insize,
                             preprocessing=PREPROCESSING, options=dict(conv=args.conv, batchsize=args.batchsize),
                             model=dict(path=source['path'], digest=source['digest'], split=trained_on,
                                        source=source.get('source'), step=source.get('step')), **stream)
    record['tag'] = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
    return record


def produce(jobs, data_root, inputs, batch_shape, out, stop):
    """Decoder thread: for each clip, ('batch', clip, inputs) messages of its frames' inputs (`inputs`: a function
    of STREAM_INPUTS, given the clip's path), then ('end' or 'fail', clip, frames read, frames claimed, reason).
    Runs ahead of the network by the queue's size."""
    batchsize = batch_shape[0]
    for clip in jobs:
        if stop.is_set():
            return
        path = os.path.join(data_root, clip.path)
        read, claimed = 0, 0
        try:
            info = video_info(path)
            claimed, batch, filled = info.frames, None, 0
            for write in inputs(path):
                if batch is None:  # each batch a new array: the network may still hold the previous one
                    batch = np.empty(batch_shape, np.float32)
                write(out=batch[filled])
                read += 1
                filled += 1
                if filled == batchsize:
                    out.put(('batch', clip, batch))
                    batch, filled = None, 0
            if filled:
                out.put(('batch', clip, batch[:filled]))
            if not read:
                out.put(('fail', clip, 0, claimed, 'no frame could be decoded'))
            elif info.truncated:
                out.put(('end', clip, read, claimed, f'decoded {read} of the {claimed} frames its container promises: '
                                                     'the file is cut short (an interrupted copy or download?)'))
            elif read < info.stored - 1:
                out.put(('end', clip, read, claimed, f'decoded {read} of the {info.stored} frames the file holds: '
                                                     'the others do not decode (damaged data)'))
            else:
                out.put(('end', clip, read, claimed, ''))
        except VideoError as e:
            out.put(('fail', clip, read, claimed, e.reason))
        except Exception as e:  # a decoder surprise must not end a 2-hour job: report the clip and go on
            out.put(('fail', clip, read, claimed, f'{type(e).__name__}: {e}'))
    out.put(None)


def extract_shard(args, held):
    """The shard's clips through the network; `held` (an ExitStack) keeps the shard's lock until the caller ends."""
    classes = read_class_index(args.lists)
    clips = split_clips(args.data, args.lists, args.split, args.subsets, args.skip_missing)
    weights = [header_frame_count(os.path.join(args.data, c.path)) for c in clips]
    start, end = shard_ranges(weights, args.num_shards)[args.shard]
    model = VGGNet_1024.load_model(args.model, conv=args.conv, stream=args.stream)
    batch_shape = (args.batchsize, model.in_channels, model.insize, model.insize)
    check_memory(VGGNet.memory_needed(model.insize, model.widths, model.fc6.W.shape[0], model.fc8.W.shape[0],
                                      model.fc7.W.shape[0], args.batchsize, training=False,
                                      in_channels=model.in_channels)
                 | {f'{args.prefetch} batches waiting (--prefetch)': 4 * int(np.prod(batch_shape)) * args.prefetch},
                 args.device, 'lower --batchsize (or --prefetch)')
    if model.fc8.W.shape[0] != len(classes):
        raise DataError(f'{args.model} predicts {model.fc8.W.shape[0]} classes but {args.lists}/classInd.txt '
                        f'lists {len(classes)}; was it trained on these lists?')
    record = extraction_record(args, model)
    store = ExtractionStore(output_folders(args))
    todo = clips_to_do(store, clips[start:end], record['tag'], args.model)
    os.makedirs(args.log_dir, exist_ok=True)
    shard_name = f'shard_{args.shard:02d}_of_{args.num_shards:02d}'
    failures = FailureLog(os.path.join(args.log_dir, f'failures_{shard_name}.tsv'))
    print(f'shard {args.shard} of {args.num_shards}: clips {start}-{end - 1} of {len(clips)} '
          f'({sum(weights[start:end])} frames); {(end - start) - len(todo)} already done by this extraction '
          f'({record["tag"]}), {len(todo)} to do', file=sys.stderr)
    # One job per shard, taken once every check has passed.
    held.enter_context(store.shard(args.shard, args.num_shards))
    store.start(record)
    device = use_device(model, args.device)

    messages, stop = queue.Queue(maxsize=args.prefetch), threading.Event()
    frames_of = dict(zip(clips, weights))
    frames_todo = sum(frames_of[c] for c in todo)
    workers = args.decoders
    flow = FlowSettings(**model.flow) if model.flow else None
    inputs = functools.partial(STREAM_INPUTS[model.stream], insize=model.insize, flow=flow)
    threads = [threading.Thread(target=produce, args=(todo[w::workers], args.data, inputs, batch_shape, messages,
                                                      stop), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    progress = Progress(max(frames_todo, 1), 'frames', f'shard {args.shard}: ')
    pending, finished, counts = {}, 0, dict(complete=0, partial=0, skipped=0)
    try:
        while finished < len(threads):
            message = messages.get()
            if message is None:
                finished += 1
                continue
            kind, clip = message[0], message[1]
            if kind == 'batch':  # every output of the network, kept per clip until the clip ends
                outputs = model.outputs(device.send(message[2]))
                for output, array in outputs.items():
                    pending.setdefault(clip.path, {}).setdefault(output, []).append(
                        chainer.backends.cuda.to_cpu(array))
                progress.update(len(message[2]), f'{counts["complete"] + counts["partial"]} clips')
                continue
            _, _, read, claimed, reason = message
            outputs = {output: np.concatenate(arrays) for output, arrays in pending.pop(clip.path, {}).items()}
            if kind == 'fail':
                counts['skipped'] += 1
                failures.record(clip.path, 'skipped', read, claimed, reason)
            elif not all(np.isfinite(array).all() for array in outputs.values()):
                counts['skipped'] += 1
                failures.record(clip.path, 'skipped', read, claimed, 'the network produced NaN or inf')
            else:
                store.save(clip.path, outputs)
                counts['partial' if reason else 'complete'] += 1
                if reason:
                    failures.record(clip.path, 'kept-partial', read, claimed, reason)
                else:
                    failures.forget(clip.path)
    finally:
        stop.set()
    seconds = time.time() - progress.start
    summary = dict(shard=args.shard, num_shards=args.num_shards, clips_in_shard=end - start,
                   done_before=(end - start) - len(todo), extraction=record['tag'], seconds=round(seconds, 1),
                   frames_per_second=round(progress.done / max(seconds, 1e-9), 2),
                   failures_file=failures.path, **counts)
    with atomic_path(os.path.join(args.log_dir, f'summary_{shard_name}.json')) as tmp, open(tmp, 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'shard {args.shard} done: {counts["complete"]} clips complete, {counts["partial"]} kept partial, '
          f'{counts["skipped"]} skipped, {summary["done_before"]} done before; {summary["frames_per_second"]} frames/s'
          + (f'; see {failures.path}' if failures.rows else ''), file=sys.stderr)
    return summary


def clips_to_do(store, clips, tag, model_path):
    """The clips whose outputs this extraction (`tag`) has not written, saying how many hold another's."""
    made_by = {clip: store.tag_of(clip.path) for clip in clips}
    todo = [clip for clip in clips if made_by[clip] != tag]
    others = sum(made_by[clip] is not None for clip in todo)
    if others:
        warn(f'{others} clips of this shard hold files of another extraction (another model, split or '
             f'preprocessing): re-extracting them with {model_path}')
    unaccounted = [clip for clip in todo
                   if made_by[clip] is None and any(map(os.path.exists, store.paths(clip.path).values()))]
    if unaccounted:
        first = unaccounted[0].path
        warn(f'{len(unaccounted)} clips of this shard have files that no extraction record accounts for (e.g. '
             f'{first}: {store.why_not(first)}): re-extracting them')
    return todo


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_stream_flag(p, NETWORK_STREAMS)
    add_data_flags(p)
    p.add_argument('--subsets', nargs='+', default=['train', 'test'], choices=('train', 'test'))
    p.add_argument('--model', default=StreamPath('VGG_1024.model'), help='fine-tuned weights from frameBasedTrain.py')
    add_output_folder_flags(p)
    p.add_argument('--log-dir', default=StreamPath('extraction_logs'), help='failures and summary files of each shard')
    p.add_argument('--shard', type=nonnegative_int, default=0, help='which shard this job does, 0 .. num-shards-1')
    p.add_argument('--num-shards', type=positive_int, default=12)
    add_device_flag(p)
    p.add_argument('--batchsize', '-b', type=positive_int, default=32, help='frames per forward pass')
    p.add_argument('--decoders', '-j', type=positive_int, default=2,
                   help='decoding threads (FFmpeg decodes outside the GIL)')
    p.add_argument('--prefetch', type=positive_int, default=8, help='decoded batches allowed to wait for the network')
    add_conv_flag(p)
    p.add_argument('--skip-missing', action='store_true', help='go on when listed clips are missing on disk')
    p.add_argument('--allow-other-split', action='store_true',
                   help='extract with a model fine-tuned on another split (its training clips include test clips '
                        'of this split: every accuracy comes out inflated)')
    return p


def parse_args(argv=None):
    p = make_parser()
    args = apply_stream(p.parse_args(argv))
    if not 0 <= args.shard < args.num_shards:
        p.error(f'--shard must be in 0..{args.num_shards - 1}')
    return args


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error(), contextlib.ExitStack() as held:
        return extract_shard(args, held)


if __name__ == '__main__':
    main()
