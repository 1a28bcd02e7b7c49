"""Use what you trained: classify any video with the fine-tuned network and the LSTM, and see what they saw.

    python classifyVideo.py my_clip.mp4 more_videos/             # files, or folders of them
    python classifyVideo.py clip.avi --annotate clip_labelled.mp4 # the video back, its running prediction drawn
    python classifyVideo.py clip.avi --stream two-stream          # RGB, flow and fused (needs the flow stream's)
    python classifyVideo.py long.mp4 --stride 5 --json            # every 5th frame; JSON for scripts

For each video it prints the single-frame top 5 (each class's log-probability summed over the frames, as
singleFrameAccuracy.py scores a test clip) and the LSTM's (rnn.py's --inference technique over the whole video,
as rnn.py scores a test clip), with class names and probabilities: each clip score made a distribution (the
normalised geometric mean of the frames' or the steps' probabilities), so the order is the pipeline's. In --out
it draws the top classes' probability along the video: every classified frame's single-frame probability, the
LSTM's running prediction (its state carried from the first frame), and its prediction of each window of
--seqlen frames, so that the label's changes along a long video show.

The models must belong together: the LSTM trained on features of this fine-tuned model's extraction, normalised
with these statistics; anything else is refused, naming the file that does not belong. A video is read once
(twice with --annotate) and streamed: memory holds a batch of frames and the steps' class scores; the features
wait in a temporary file. --stride K classifies every K-th frame only: K times less network time, but the LSTM
then sees the motion K times faster than it was trained on, and a single-frame result rests on K times fewer
frames.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import json
import os
import sys
import tempfile
import time

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import numpy as np

import VGGNet_1024
import rnn
from helperFunctions import VIDEO_EXTENSIONS, read_class_index
from ucf.errors import DataError, warn
from ucf.files import atomic_path, check_outputs
from ucf.flags import (HelpFormatter, add_conv_flag, add_device_flag, fraction, nonnegative_int, positive_int,
                       use_device)
from ucf.flow import FlowError, FlowSettings
from ucf.packed_hdf5 import FeatureStats
from ucf.provenance import describe_extraction, extraction_of
from ucf.results import single_frame_score
from ucf.runcontrol import exit_on_user_error
from ucf.streams import STREAM_INPUTS, StreamPath, add_stream_flag, add_stream_input, apply_stream
from ucf.video import VideoError, frame_rate, iter_frames, video_info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('videos', nargs='+', help='video files, or folders holding them (searched below)')
    models = p.add_argument_group('the trained models (the handout\'s names)')
    add_stream_flag(models)
    add_stream_input(models, '--model', 'VGG_1024.model', 'fine-tuned network')
    add_stream_input(models, '--stats', 'feature_stats1024.npz', 'normalisation statistics (normalizeData.py)')
    models.add_argument('--rnn', default=StreamPath('rnn.model'), help='the LSTM (rnn.py)')
    models.add_argument('--lists', default='ucfTrainTestlist',
                        help='classInd.txt, for the class names where the models do not record them')
    scoring = p.add_argument_group('scoring')
    scoring.add_argument('--inference', default='full', choices=list(rnn.INFERENCE),
                         help="the LSTM's technique over the whole video and each window: "
                              + '; '.join(f'{k}: {t.help}' for k, t in rnn.INFERENCE.items()))
    scoring.add_argument('--seqlen', type=positive_int, default=None,
                         help='frames of an LSTM window and a segment (None: what rnn.py trained it with)')
    scoring.add_argument('--segments', type=positive_int, default=None, help='sequences of [segments] (None: rnn.py\'s)')
    scoring.add_argument('--flow-weight', type=fraction, default=0.6,
                         help="two-stream: the flow stream's share of each frame's probabilities")
    scoring.add_argument('--stride', type=positive_int, default=1,
                         help='classify every K-th frame (the LSTM then sees motion K times faster than in training)')
    scoring.add_argument('--top', type=positive_int, default=5, help='classes listed per model')
    output = p.add_argument_group('output')
    output.add_argument('--out', '-o', default='classified', help='folder for the pictures (<video>.png)')
    output.add_argument('--annotate', default=None, metavar='OUT.mp4',
                        help='write the video back (H.264, yuv420p: any browser plays it) with its running '
                             'prediction drawn on every frame; a folder when several videos are given')
    output.add_argument('--json', action='store_true', help='print the results as JSON (stdout) instead of tables')
    run = p.add_argument_group('running')
    run.add_argument('--batchsize', '-b', type=positive_int, default=32, help='frames per forward pass')
    run.add_argument('--window-step', type=nonnegative_int, default=0,
                     help='frames between the LSTM windows\' starts in the picture (0: --seqlen, windows side by side)')
    add_conv_flag(run)
    add_device_flag(run)
    return apply_stream(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------------------
# The models, and that they belong together
# ----------------------------------------------------------------------------------------------------------

class Models:
    """The fine-tuned network(s), their statistics and the LSTM, checked to belong together: the LSTM was
    trained on the features of these networks' extractions, normalised with these statistics."""

    def __init__(self, args):
        self.stream, self.streams = args.stream, (['rgb', 'flow'] if args.stream == 'two-stream' else [args.stream])
        paths = {'rgb': (args.model, args.stats), 'flow': (args.flow_model, args.flow_stats)}
        if args.stream == 'flow':
            paths['flow'] = (args.model, args.stats)
        self.networks, self.stats = {}, {}
        for stream in self.streams:
            model_path, stats_path = paths[stream]
            self.networks[stream] = VGGNet_1024.load_model(model_path, conv=args.conv, stream=stream)
            self.stats[stream] = FeatureStats.load(stats_path)
        self.lstm, record, classes = rnn.load_model(args.rnn)
        self.options = record.get('options', {})
        trained = record.get('train', {})
        parts = trained if args.stream == 'two-stream' and set(trained) >= {'rgb', 'flow'} else {args.stream: trained}
        for stream in self.streams:
            model_path, stats_path = paths[stream]
            self.check_belongs(args.rnn, parts.get(stream, {}), model_path, self.networks[stream], stats_path,
                               self.stats[stream])
        recorded_stream = self.options.get('stream', 'rgb')
        if recorded_stream != args.stream:
            raise DataError(f'{args.rnn} is the LSTM of the {recorded_stream} stream, not of the {args.stream} '
                            f'stream: pass --stream {recorded_stream}, or the {args.stream} stream\'s LSTM')
        widths = sum(n.fc7.W.shape[0] for n in self.networks.values())
        if self.lstm.upward[0].W.shape[1] != widths:
            raise DataError(f'{args.rnn} reads {self.lstm.upward[0].W.shape[1]}-d features but '
                            f'{" + ".join(paths[s][0] for s in self.streams)} make {widths}-d ones')
        self.classes = classes or self.networks[self.streams[0]].provenance.get('classes') or \
            read_class_index(args.lists)
        counts = {len(self.classes), self.lstm.out.W.shape[0], *(n.fc8.W.shape[0] for n in self.networks.values())}
        if len(counts) != 1:
            raise DataError(f'the models score different numbers of classes ({", ".join(map(str, sorted(counts)))}) '
                            f'with {len(self.classes)} class names: they were not trained together')
        self.seqlen = args.seqlen or self.options.get('seqlen', 120)
        self.segments = args.segments or self.options.get('segments', 5)
        self.padding = self.options.get('padding', 'reverse')
        self.flow = {s: FlowSettings(**n.flow) if n.flow else None for s, n in self.networks.items()}

    @staticmethod
    def check_belongs(rnn_path, trained, model_path, network, stats_path, stats):
        """DataError naming the file that does not belong: the network whose features the LSTM was not trained
        on, or statistics other than those its features were normalised with."""
        extraction = extraction_of(trained)
        if extraction is None:
            warn(f'{rnn_path} records no extraction (written by an older version): cannot check that it was trained '
                 f'on the features of {model_path}')
            return
        digest = network.provenance.get('digest')
        if extraction.get('model', {}).get('digest') != digest:
            raise DataError(f'{model_path} does not belong: {rnn_path} was trained on features of '
                            f'{describe_extraction(extraction)}, not of {model_path} (digest {digest}). Pass the '
                            'fine-tuned model it was trained with, or train rnn.py on this model\'s features')
        recorded = trained.get('statistics', {})
        if 'digest' in recorded and recorded['digest'] != stats.digest or \
                'digest' not in recorded and recorded.get('frames') not in (None, stats.frames):
            raise DataError(f'{stats_path} does not belong: {rnn_path} was trained on features normalised with '
                            f'the statistics of {recorded.get("path", "another training set")} '
                            f'({recorded.get("frames", "?")} frames); pass the feature_stats file normalizeData.py '
                            'wrote beside them')
        own = extraction_of(stats.record)
        if own is not None and own.get('tag') != extraction.get('tag'):
            raise DataError(f'{stats_path} does not belong: it was computed on features of '
                            f'{describe_extraction(own)}, the LSTM on those of {describe_extraction(extraction)}')


# ----------------------------------------------------------------------------------------------------------
# One video: the networks over its frames, the scores, the LSTM over windows
# ----------------------------------------------------------------------------------------------------------

class Features:
    """The classified frames' normalised features of one or two streams side by side, from their temporary
    files (memory maps): what the LSTM reads, a slice or a list of rows at a time."""

    def __init__(self, maps):
        self.maps = maps

    def __len__(self):
        return len(self.maps[0])

    def __getitem__(self, rows):
        return np.concatenate([np.asarray(m[rows]) for m in self.maps], axis=-1)


def run_network(path, stream, models, args, device, scratch, timings):
    """(softmax of every classified frame, a memory map of their normalised features, frames decoded) of one
    stream of a video: its inputs made frame by frame (STREAM_INPUTS, as extraction makes them), batched through
    the network."""
    network, stats = models.networks[stream], models.stats[stream]
    batch = np.empty((args.batchsize, network.in_channels, network.insize, network.insize), np.float32)
    probs, filled, width, decoded = [], 0, network.fc7.W.shape[0], 0
    features = open(os.path.join(scratch, f'{stream}.f32'), 'wb')

    def forward(n):
        started = time.perf_counter()
        prob, feature = network.predict(device.send(batch[:n]))
        probs.append(chainer.backends.cuda.to_cpu(prob))
        features.write(stats.normalize(chainer.backends.cuda.to_cpu(feature)).tobytes())
        timings['network'] += time.perf_counter() - started
    started = time.perf_counter()
    with features:
        for index, write in enumerate(STREAM_INPUTS[stream](path, network.insize, models.flow[stream])):
            decoded = index + 1
            if index % args.stride:
                continue
            write(out=batch[filled])
            filled += 1
            if filled == args.batchsize:
                timings['decode and inputs'] += time.perf_counter() - started
                forward(filled)
                filled, started = 0, time.perf_counter()
        timings['decode and inputs'] += time.perf_counter() - started
        if filled:
            forward(filled)
    if not probs:
        raise VideoError(path, 'no frame could be decoded')
    count = sum(len(p) for p in probs)
    return np.concatenate(probs), np.memmap(features.name, np.float32, 'r', shape=(count, width)), decoded


def distribution(score):
    """A clip score (a mean of log-probabilities) as probabilities: their normalised geometric mean."""
    p = np.exp(score - score.max())
    return p / p.sum()


def top(probabilities, classes, k):
    order = np.argsort(-probabilities, kind='stable')[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def classify(path, models, args, device, timings):
    """Everything about one video: its results per model ({label: top classes}), the scores, and the timelines
    the picture and the annotation draw."""
    info = video_info(path)
    video = dict(path=path, width=info.width, height=info.height, fps=info.fps, stride=args.stride, results={},
                 scores={}, notes=[])
    with tempfile.TemporaryDirectory(prefix='classify_') as scratch:
        probs, maps = {}, {}
        for stream in models.streams:
            try:
                probs[stream], maps[stream], video['frames'] = run_network(path, stream, models, args, device,
                                                                           scratch, timings)
            except FlowError as e:  # a one-frame video: no motion to read
                video['notes'].append(f'no {stream} stream: {e.reason}')
        if not probs:
            raise VideoError(path, video['notes'][0].split(': ', 1)[1])
        first = next(iter(probs.values()))
        video['classified'] = len(first)
        frame_probs = {}
        for stream, p in probs.items():
            label = 'single frame' if models.stream != 'two-stream' else f'{stream} single frame'
            frame_probs[label], video['scores'][label] = p, single_frame_score([p])
        if len(probs) == 2:  # fused as singleFrameAccuracy.py --stream two-stream fuses
            w = args.flow_weight
            frame_probs['two-stream single frame'] = (1 - w) * probs['rgb'] + w * probs['flow']
            video['scores']['two-stream single frame'] = single_frame_score([probs['rgb'], probs['flow']], (1 - w, w))
        for label, score in video['scores'].items():  # a sum over the frames: their mean is the distribution's
            video['results'][label] = top(distribution(score / len(first)), models.classes, args.top)
        lstm_label = f'{"two-stream " if models.stream == "two-stream" else ""}LSTM [{args.inference}]'
        if len(maps) < len(models.streams) or len(first) < 2:
            video['notes'].append('no LSTM result: ' + ('one frame is no sequence' if len(first) < 2 else
                                                         'it reads both streams\' features'))
            steps = windows = None
        else:
            started = time.perf_counter()
            features = Features([maps[s] for s in models.streams])
            scores, steps = rnn.sequence_scores(models.lstm, features, [args.inference], models.seqlen,
                                                models.segments, models.padding)
            video['scores'][lstm_label] = scores[args.inference]  # already a mean over the steps
            video['results'][lstm_label] = top(distribution(scores[args.inference]), models.classes, args.top)
            windows = lstm_windows(models, features, args)
            timings['LSTM'] += time.perf_counter() - started
            del features
        maps.clear()  # the memory maps go before their folder
    video['timeline'] = dict(frame=frame_probs, steps=None if steps is None else np.exp(steps), windows=windows)
    return video


def lstm_windows(models, features, args):
    """[(first frame, last frame, class probabilities)] of the LSTM's technique on each window of --seqlen
    classified frames (its state reset at each), windows --window-step apart."""
    step, n = args.window_step or models.seqlen, len(features)
    starts = list(range(0, max(n - models.seqlen, 0) + 1, step))
    if starts[-1] + models.seqlen < n:  # the last window ends with the video
        starts.append(n - models.seqlen)
    out = []
    for start in starts:
        window = features[start:start + models.seqlen]
        scores, _ = rnn.sequence_scores(models.lstm, window, [args.inference], models.seqlen, models.segments,
                                        models.padding)
        out.append((start, start + len(window) - 1, distribution(scores[args.inference])))
    return out


# ----------------------------------------------------------------------------------------------------------
# Showing it: tables, JSON, the picture, the annotated video
# ----------------------------------------------------------------------------------------------------------

def print_table(video, stream=sys.stdout):
    size = f'{video["width"]}x{video["height"]}, {video["fps"]:.2f} fps'
    every = 'every frame' if video['stride'] == 1 else f'every {video["stride"]}th frame'
    print(f'{video["path"]}: {video["classified"]} frames classified ({every}), {size}', file=stream)
    for note in video['notes']:
        print(f'  note: {note}', file=stream)
    labels = list(video['results'])
    widths = [max(len(label), *(len(c) + 7 for c, _ in video['results'][label])) for label in labels]
    print('       ' + '   '.join(label.ljust(w) for label, w in zip(labels, widths)), file=stream)
    for rank in range(max(len(r) for r in video['results'].values())):
        cells = []
        for label, w in zip(labels, widths):
            rows = video['results'][label]
            cells.append((f'{rows[rank][0]} {rows[rank][1]:.3f}' if rank < len(rows) else '').ljust(w))
        print(f'  {rank + 1:>3}  ' + '   '.join(cells), file=stream)


def draw_timeline(video, classes, png):
    """The top classes' probability along the video: each classified frame's single-frame probability (thin),
    the LSTM's running prediction (thick), and each window's LSTM prediction (dashed steps)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    timeline = video['timeline']
    shown = []
    for rows in video['results'].values():
        shown += [c for c, _ in rows[:3] if c not in shown]
    t = np.arange(video['classified']) * video['stride'] / video['fps']
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    single = timeline['frame'].get('two-stream single frame', next(iter(timeline['frame'].values())))
    for k, name in enumerate(shown[:6]):
        c, colour = classes.index(name), colours[k % len(colours)]
        ax.plot(t, single[:, c], color=colour, linewidth=0.8, alpha=0.6, label=f'{name}: single frame')
        if timeline['steps'] is not None:
            ax.plot(t, timeline['steps'][:, c], color=colour, linewidth=2.2, label=f'{name}: LSTM, running')
        for first, last, p in timeline['windows'] or []:
            ax.hlines(p[c], t[first], t[last], colors=colour, linestyles='dashed', linewidth=1.5)
    ax.set_xlabel('time (s)')
    ax.set_ylabel('probability')
    ax.set_ylim(0, 1.02)
    ax.set_title(f'{os.path.basename(video["path"])}: ' + '; '.join(f'{label} {rows[0][0]}' for label, rows in
                                                                     video['results'].items()), fontsize=9)
    ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=7, title='dashed: LSTM per window',
              title_fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or '.', exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format='png', bbox_inches='tight')
    plt.close(fig)


def annotate(video, classes, out_path, timings):
    """The video again, each frame with the running prediction drawn on it (the single frame's and the LSTM's
    label and a bar chart of the LSTM's top three), as H.264 yuv420p at the input's rate, frame for frame."""
    import av
    from PIL import Image, ImageDraw, ImageFont
    timeline, stride = video['timeline'], video['stride']
    single = timeline['frame'].get('two-stream single frame', next(iter(timeline['frame'].values())))
    running = timeline['steps'] if timeline['steps'] is not None else single
    width, height = video['width'] + video['width'] % 2, video['height'] + video['height'] % 2  # yuv420p: even
    font = ImageFont.load_default(size=max(9, height // 20))
    rate = frame_rate(video['path'])
    frames = 0
    with atomic_path(out_path) as tmp:
        container = av.open(tmp, 'w', format='mp4', options={'movflags': '+faststart'})
        stream = container.add_stream('libx264', rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        stream.options = {'crf': '20', 'preset': 'veryfast'}
        for frame in iter_frames(video['path']):
            started = time.perf_counter()
            k = min(frame.index // stride, len(single) - 1)
            image = Image.new('RGB', (width, height))
            image.paste(Image.fromarray(frame.rgb))
            draw = ImageDraw.Draw(image, 'RGBA')
            line = font.size + 3
            best = [(classes[i], running[k, i]) for i in np.argsort(-running[k])[:3]]
            draw.rectangle([0, 0, width, 2 * line + 3 * line + 6], fill=(0, 0, 0, 140))
            draw.text((4, 2), f'single frame: {classes[int(single[k].argmax())]} {single[k].max():.2f}',
                      fill=(255, 255, 255), font=font)
            draw.text((4, 2 + line), f'{"LSTM" if timeline["steps"] is not None else "single frame"}: {best[0][0]} '
                                     f'{best[0][1]:.2f}', fill=(255, 230, 120), font=font)
            for r, (name, p) in enumerate(best):
                y = 4 + (2 + r) * line
                draw.rectangle([4, y, 4 + int(p * (width // 3)), y + line - 3], fill=(255, 230, 120, 220))
                draw.text((8 + width // 3, y - 1), f'{name} {p:.2f}', fill=(255, 255, 255), font=font)
            timings['drawing'] += time.perf_counter() - started
            started = time.perf_counter()
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
            frames += 1
            timings['encoding'] += time.perf_counter() - started
        for packet in stream.encode():
            container.mux(packet)
        container.close()
    return frames


def video_paths(inputs):
    """The videos named, and those below the folders named, in order; DataError for a path that is neither."""
    paths = []
    for name in inputs:
        if os.path.isdir(name):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(name) for f in files
                           if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS)
            if not found:
                raise DataError(f'{name}: no video in this folder (looked for {" ".join(VIDEO_EXTENSIONS)})')
            paths += found
        elif os.path.isfile(name):
            paths.append(name)
        else:
            raise DataError(f'{name}: no such file or folder')
    return paths


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        paths = video_paths(args.videos)
        several = len(paths) > 1
        if args.annotate and several and os.path.splitext(args.annotate)[1]:
            raise DataError(f'--annotate {args.annotate}: {len(paths)} videos need a folder for their annotated '
                            'copies (--annotate FOLDER)')
        check_outputs({'--model': args.model, '--rnn': args.rnn, **{f'the video {p}': p for p in paths}},
                      {} if not args.annotate or several else {'--annotate': args.annotate},
                      {'--out': args.out, **({'--annotate': args.annotate} if args.annotate and several else {})})
        models = Models(args)
        device = use_device(models.lstm, args.device)
        for network in models.networks.values():
            network.to_device(device)
        videos, failed = [], []
        for path in paths:
            timings = dict.fromkeys(('decode and inputs', 'network', 'LSTM', 'picture', 'drawing', 'encoding'), 0.0)
            try:
                video = classify(path, models, args, device, timings)
            except VideoError as e:
                failed.append(f'{path}: {e.reason}')
                print(f'error: {path}: {e.reason}', file=sys.stderr)
                continue
            started = time.perf_counter()
            stem = os.path.splitext(os.path.basename(path))[0]
            video['picture'] = os.path.join(args.out, stem + '.png')
            draw_timeline(video, models.classes, video['picture'])
            timings['picture'] = time.perf_counter() - started
            if args.annotate:
                video['annotated'] = os.path.join(args.annotate, stem + '.mp4') if several else args.annotate
                video['frames'] = annotate(video, models.classes, video['annotated'], timings)
            video['seconds'] = {k: round(v, 3) for k, v in timings.items() if v}
            videos.append(video)
            if not args.json:
                print_table(video)
                print(f'  picture: {video["picture"]}' + (f'; annotated: {video["annotated"]}' if args.annotate
                                                          else ''), file=sys.stdout)
                print('  seconds: ' + ', '.join(f'{k} {v:.1f}' for k, v in video['seconds'].items()),
                      file=sys.stderr)
        if args.json:
            json.dump(dict(videos=[{k: v for k, v in v.items() if k not in ('timeline', 'scores')} for v in videos],
                           failed=failed), sys.stdout, indent=1)
            print()
        if failed:
            raise DataError(f'{len(failed)} of {len(paths)} videos could not be classified (above)')
    return videos


if __name__ == '__main__':
    main()
