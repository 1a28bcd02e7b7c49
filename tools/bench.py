"""Benchmarks, measured side by side in one run on this machine; writes bench/results.md and bench/results.json.

    make bench                      # everything (the full-scale packing writes ~25 GB under --work)
    python tools/bench.py --quick         # small packing scale, fewer repetitions
    python tools/bench.py --only lstm evaluation decoding   # measure these again, keep the other figures

Each figure comes with the reference it is compared to, measured in the same run (the machine may be shared and
noisy, so only ratios taken together mean much):
- VGG16 forward at 224x224 through the extraction path (VGGNet_1024.predict), stock Chainer and fast_conv, against
  the float32 matrix-multiply rate measured now (VGG16 is ~30.9 GFLOP a frame, so that rate is a ceiling), and
  against the same network in PyTorch when a PyTorch environment can be made (.venv-torch, never a project
  dependency);
- decoding + preprocessing frames/s against bare decoding (ffmpeg to raw video) and against preprocess_frame v1
  (Pillow's resize), with how far the two preprocessings' values are apart;
- random training-frame samples/s (exact random access), and the extraction pipeline's frames/s against its
  slower stage;
- LSTM training step at the handout's size (batch 32 x 120 frames x 1024 -> 512), Chainer and PyTorch in
  alternating rounds; rnn.py's test evaluation against the same without the shared input projection;
- packing and normalising 13,320 clips of generated features: time and peak memory;
- converting a caffemodel of VGG_ILSVRC_16_layers.caffemodel's size and layout (553 MB): time, peak memory, and
  whether every weight came through bit for bit.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: its steps and ucf/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import numpy as np


VGG16_GFLOP = 30.94  # multiply-adds x 2 of one 224x224 frame through conv1_1 ... fc8
TORCH_VENV = os.path.join(ROOT, '.venv-torch')
# batch 32 is extraction's default (the handout fine-tunes with 36); the stock path is too slow to wait for there
VGG_BATCHES = (('stock', (1, 8)), ('fast', (1, 8, 32)))


def alternating_rounds(runs, rounds):
    """{name: [seconds of each round]} of functions run in turn, `rounds` times: side by side, so that a change
    of the machine's load falls on all of them."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def best_time(function, repeat):
    """Smallest wall time of `repeat` calls after one warm-up: the least disturbed by other load."""
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def sgemm_gflops(repeat):
    a = np.random.rand(4096, 4096).astype(np.float32)
    b = np.random.rand(4096, 4096).astype(np.float32)
    return 2 * 4096 ** 3 / best_time(lambda: a @ b, repeat) / 1e9


def vgg_fps(conv, batch, repeat):
    import VGGNet_1024
    np.random.seed(0)
    model = VGGNet_1024.VGGNet_1024(101, 224, conv=conv)
    x = np.random.RandomState(0).normal(0, 50, (batch, 3, 224, 224)).astype(np.float32)
    return batch / best_time(lambda: model.predict(x), repeat)


def finetune_step_seconds(conv, batch, repeat):
    """One fine-tuning update at 224x224 with the handout's setup (fc7 and fc8 learn, MomentumSGD, weight decay)."""
    import chainer
    import VGGNet_1024
    np.random.seed(0)
    model = VGGNet_1024.VGGNet_1024(101, 224, conv=conv)
    optimizer = chainer.optimizers.MomentumSGD(lr=0.0005, momentum=0.9)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(0.0005))
    model.freeze_below_train_from()
    x = np.random.RandomState(0).normal(0, 50, (batch, 3, 224, 224)).astype(np.float32)
    t = np.arange(batch, dtype=np.int32) % 101
    reporter = chainer.Reporter()
    reporter.add_observer('main', model)
    with reporter.scope({}):
        return best_time(lambda: optimizer.update(model, x, t), repeat)


def torch_python():
    """The interpreter of a PyTorch environment beside the project's, made on first use; None if impossible."""
    python = os.path.join(TORCH_VENV, 'bin', 'python')
    if not os.path.exists(python):
        made = subprocess.run([sys.executable, '-m', 'venv', TORCH_VENV]).returncode == 0 and subprocess.run(
            [python, '-m', 'pip', 'install', '-q', 'torch==2.13.0', 'numpy<2']).returncode == 0
        if not made:
            return None
    ok = subprocess.run([python, '-c', 'import torch'], capture_output=True).returncode == 0
    return python if ok else None


TORCH_CODE = r'''
import json, sys, time
import torch, torch.nn as nn
torch.manual_seed(0)
repeat, part = int(sys.argv[1]), sys.argv[2]
def best(f):
    f(); t = []
    for _ in range(repeat):
        s = time.perf_counter(); f(); t.append(time.perf_counter() - s)
    return min(t)
layers, c = [], 3
for w, n in zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)):
    for _ in range(n):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]; c = w
    layers.append(nn.MaxPool2d(2))
vgg = nn.Sequential(*layers, nn.Flatten(), nn.Linear(25088, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
                    nn.Linear(1024, 101), nn.Softmax(dim=1)).eval()
result = {'threads': torch.get_num_threads(), 'version': torch.__version__}
with torch.no_grad():
    for batch in (1, 8, 32) if part == 'vgg' else ():
        x = torch.randn(batch, 3, 224, 224) * 50
        result[f'vgg_fps_b{batch}'] = batch / best(lambda: vgg(x))
if part == 'vgg':
    print(json.dumps(result))
    sys.exit()
# part 'lstm': after one warm-up step, one timed step for every line read, its seconds printed
lstm, head = nn.LSTM(1024, 512, batch_first=True), nn.Sequential(nn.Linear(512, 512), nn.Sigmoid(), nn.Linear(512, 101))
params = list(lstm.parameters()) + list(head.parameters())
opt = torch.optim.Adam(params, 1e-3)
x, t = torch.randn(32, 120, 1024), torch.randint(0, 101, (32,))
def step():
    state = None
    for s in range(0, 120, 30):
        out, state = lstm(x[:, s:s + 30], state)
        state = tuple(v.detach() for v in state)
        y = head(out.reshape(-1, 512))
        loss = nn.functional.cross_entropy(y, t.repeat_interleave(30))
        opt.zero_grad(); loss.backward(); opt.step()
step()
print(json.dumps(result), flush=True)
for line in sys.stdin:
    s = time.perf_counter(); step(); print(time.perf_counter() - s, flush=True)
'''


def torch_figures(repeat, part):
    """PyTorch's VGG16 forward figures ('vgg'), or None without PyTorch."""
    python = torch_python()
    if not python:
        return None
    out = subprocess.run([python, '-c', TORCH_CODE, str(repeat), part], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {'error': out.stderr.strip()[-300:]}


def vgg_figures(r, repeat, rounds, with_torch):
    """VGG16 forward frames/s, stock and fast Chainer and PyTorch, in alternating rounds; the best round of each
    (on a shared, noisy machine, alternating keeps one side from getting all the quiet minutes). Returns the
    PyTorch figures, None without PyTorch."""
    torch = {} if with_torch else None
    for _ in range(rounds):
        for conv, batches in VGG_BATCHES:
            for batch in batches:
                key = f'vgg_{conv}_fps_b{batch}'
                r[key] = max(r.get(key, 0), vgg_fps(conv, batch, repeat))
        if torch is not None and 'error' not in torch:
            figures = torch_figures(repeat, 'vgg')
            if figures is None or 'error' in figures:
                torch = figures
            else:
                torch.update({k: max(v, torch.get(k, 0)) if k.startswith('vgg') else v for k, v in figures.items()})
    return torch


def lstm_step():
    """One training step of rnn.py's LSTM at the handout's size (batch 32 x 120 frames x 1024 -> 512, BPTT 30,
    Adam as rnn.py trains), as a function; warmed up."""
    import chainer
    import rnn
    from ucf import fast_lstm
    np.random.seed(0)
    model = rnn.RNN(1024, 512, 1, 512, 101)
    optimizer = fast_lstm.LeanAdam(1e-3)
    optimizer.setup(model)
    rng = np.random.RandomState(0)
    data = [(rng.normal(size=(120, 1024)).astype(np.float32), np.int32(i % 101)) for i in range(32)]
    iterator = chainer.iterators.SerialIterator(data, 32)
    updater = rnn.BPTTUpdater(iterator, optimizer, chainer.get_device('@numpy'), 30)
    reporter = chainer.Reporter()
    reporter.add_observer('main', model)

    def step():
        with reporter.scope({}):
            updater.update()
    step()
    return step


def lstm_figures(rounds, with_torch):
    """The LSTM step in Chainer and the same network in PyTorch (nn.LSTM, Adam), one step each in alternating
    rounds: the best and median of each, and the median of the per-round ratios (the noise of a shared machine
    hits both sides of a round alike)."""
    step = lstm_step()
    python = torch_python() if with_torch else None
    peer = None
    if python:
        peer = subprocess.Popen([python, '-c', TORCH_CODE, '1', 'lstm'], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        header = json.loads(peer.stdout.readline() or 'null')
        if header is None:  # PyTorch failed to start: measure this side alone
            peer.wait()
            peer = None
    ours, theirs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        ours.append(time.perf_counter() - start)
        if peer:
            peer.stdin.write('\n')
            peer.stdin.flush()
            theirs.append(float(peer.stdout.readline()))
    result = dict(lstm_step_s=min(ours), lstm_step_median_s=float(np.median(ours)), rounds=rounds)
    if peer:
        peer.stdin.close()
        peer.wait()
        result.update(torch_lstm_step_s=min(theirs), torch_lstm_step_median_s=float(np.median(theirs)),
                      torch_version=header['version'], torch_threads=header['threads'],
                      speed_ratio_median=float(np.median(np.array(theirs) / np.array(ours))))
    return result


class GeneratedClips:
    """Clips of random 1024-d features with UCF-101's lengths (log-normal around 170 frames, 29-1776), in memory,
    for timing rnn.evaluate."""

    def __init__(self, count, seed=0):
        rng = np.random.RandomState(seed)
        self.sizes = np.clip(rng.lognormal(np.log(170), 0.45, count), 29, 1776).astype(int)
        self.data = [rng.normal(size=(n, 1024)).astype(np.float32) for n in self.sizes]
        self.labels = rng.randint(0, 101, count)

    def __len__(self):
        return len(self.data)

    def read(self, i):
        return self.data[i]

    def lengths(self):
        return self.sizes


def evaluate_unshared(model, clips, techniques, seqlen, segments=5, batchsize=32, padding='reverse'):
    """The reference for rnn.evaluate: every sequence of each technique (rnn.INFERENCE: the clip, each padded
    segment) through the whole network from its features, as rnn.py did before the first layer's projection was
    shared, one technique at a time."""
    import rnn
    order = np.argsort(clips.lengths(), kind='stable')
    scores = {t: np.zeros((len(clips), 101), np.float32) for t in techniques}
    for b in range(0, len(order), batchsize):
        index = order[b:b + batchsize]
        features = [clips.read(i) for i in index]
        for t in techniques:
            technique = rnn.INFERENCE[t]
            rows = [technique.sequences(len(x), seqlen, segments, padding) for x in features]
            log_probs = iter(rnn.step_log_probs(model, [x[r] for x, clip_rows in zip(features, rows)
                                                        for r in clip_rows]))
            for i, clip_rows in zip(index, rows):
                scores[t][i] = technique.score([next(log_probs) for _ in clip_rows])
    return scores


def evaluation_figures(count, repeat):
    """rnn.py's per-epoch test evaluation (full + segments, its defaults) on `count` clips of UCF-101's lengths,
    against evaluate_unshared; the same scores to float32 rounding. Scaled to the 3,783 test clips of split 1."""
    import rnn
    clips = GeneratedClips(count)
    np.random.seed(0)
    model = rnn.RNN(1024, 512, 1, 512, 101)
    techniques = ['full', 'segments']  # rnn.py's default
    shared = best_time(lambda: rnn.evaluate(model, clips, techniques, 120), repeat)
    unshared = best_time(lambda: evaluate_unshared(model, clips, techniques, 120), repeat)
    a, b = rnn.evaluate(model, clips, techniques, 120), evaluate_unshared(model, clips, techniques, 120)
    return dict(clips=count, frames=int(clips.sizes.sum()), seconds=shared, unshared_seconds=unshared,
                split1_test_seconds=shared * 3783 / count,
                max_abs_difference=float(max(np.abs(a[t] - b[t]).max() for t in a)))


def preprocess_v1(frame, size):
    """preprocess_frame v1, the reference: RGB frame -> Pillow's bilinear resize -> BGR minus the mean."""
    from PIL import Image
    from ucf.preprocessing import MEAN_BGR
    pixels = np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))
    x = np.empty((3, size, size), np.float32)
    for channel in range(3):
        np.subtract(pixels[:, :, 2 - channel], MEAN_BGR[channel], out=x[channel], dtype=np.float32)
    return x


def decoding_figures(folder, rounds):
    """Frames/s of bare decoding (ffmpeg's command line to raw RGB), of extraction's decoding + preprocessing to
    224x224 (the decoder's frames through preprocess_frame into a batch), and of the same with v1's
    preprocessing, in alternating rounds on the same clips; and how far v2's values are from v1's."""
    import imageio_ffmpeg
    from ucf import preprocessing, video
    clips = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith('.avi'))[:12]
    frames = sum(video.video_info(c).frames for c in clips)
    batch = np.empty((32, 3, 224, 224), np.float32)

    def bare():
        for c in clips:
            subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-v', 'error', '-nostdin', '-i', c, '-f', 'rawvideo',
                            '-pix_fmt', 'rgb24', '-'], stdout=subprocess.DEVNULL, check=True)

    def v2():
        for c in clips:
            for k, frame in enumerate(video.iter_frames(c)):
                preprocessing.preprocess_frame(frame, 224, out=batch[k % len(batch)])

    def v1():
        for c in clips:
            for k, frame in enumerate(video.iter_frames(c)):
                batch[k % len(batch)] = preprocess_v1(frame.rgb, 224)
    times = alternating_rounds(dict(bare=bare, v2=v2, v1=v1), rounds)
    differences = np.concatenate([np.abs(preprocessing.preprocess_frame(f, 224)
                                          - preprocess_v1(f.rgb, 224)).ravel()
                                  for c in clips[:3] for f in video.iter_frames(c)])
    return dict(frames=frames, bare_fps=frames / min(times['bare']), v2_fps=frames / min(times['v2']),
                v1_fps=frames / min(times['v1']),
                v2_of_bare_median=float(np.median(np.array(times['bare']) / np.array(times['v2']))),
                v2_v1_mean_abs=float(differences.mean()), v2_v1_max_abs=float(differences.max()),
                v2_v1_share_differing=float((differences > 0).mean()))


def motion_clips(folder, count=6, frames=60, width=320, height=240):
    """Synthetic motion clips (slides, zooms, spins) at UCF-101's size, encoded as XVID like the set, with the
    motion the generator drew: [(path, true flow fields)]."""
    import synthetic_ucf101
    specs = [s for s in synthetic_ucf101.class_specs(8, 4) if s[2] and not s[0].startswith('Fade')]
    made = []
    for k in range(count):
        name, family, direction = specs[k % len(specs)]
        truth = []
        rendered = synthetic_ucf101.render_clip(name, family, direction, 8, frames, width, height,
                                                np.random.RandomState(k), truth)
        path = os.path.join(folder, f'motion_{k}.avi')
        if not os.path.exists(path):
            synthetic_ucf101.write_avi(path, rendered, 25.0)
        made.append((path, truth))
    return made


def endpoint_errors(field, truth):
    """(mean endpoint error over all pixels, over the moving ones) of a flow field against the true one."""
    error = np.sqrt(((field - truth) ** 2).sum(axis=2))
    moving = np.abs(truth).sum(axis=2) > 0
    return float(error.mean()), float(error[moving].mean()) if moving.any() else np.nan


def flow_figures(folder, rounds):
    """Each flow algorithm's time per field at 320x240 on one thread beside decoding's time per frame, and its
    endpoint error against the synthetic set's true motion, at 320x240 and at the network's 224x224 (the geometry
    the stream uses: the truth scaled); then the flow stream's frames/s on one core (decode + flow + its input)
    beside the RGB stream's (decode + preprocessing)."""
    import cv2
    from ucf import flow, preprocessing, video
    cv2.setNumThreads(1)
    clips = motion_clips(folder)
    decoded = [video.read_frames(path) for path, _ in clips]
    greys = [[cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames] for frames in decoded]
    figures = {'algorithms': {}}
    for name in flow.FLOW_ALGORITHMS:
        times, errors, errors_224 = [], [], []
        for (path, truth), frames, g in zip(clips, decoded, greys):
            small = [flow.grey(f, 224) for f in frames]
            scale = np.array([224 / frames.shape[2], 224 / frames.shape[1]], np.float32)
            for t in range(len(g) - 1):
                start = time.perf_counter()
                field = flow.flow_field(g[t], g[t + 1], name)
                times.append(time.perf_counter() - start)
                if truth[t] is not None:
                    errors.append(endpoint_errors(field, truth[t]))
                    true_224 = cv2.resize(truth[t] * scale, (224, 224), interpolation=cv2.INTER_NEAREST)
                    errors_224.append(endpoint_errors(flow.flow_field(small[t], small[t + 1], name), true_224))
        e, e224 = np.array(errors), np.array(errors_224)
        figures['algorithms'][name] = dict(ms_per_field=1e3 * float(np.median(times)), epe=float(e[:, 0].mean()),
                                           epe_moving=float(np.nanmean(e[:, 1])), epe_224=float(e224[:, 0].mean()),
                                           epe_224_moving=float(np.nanmean(e224[:, 1])))
    n_frames = sum(len(f) for f in decoded)
    settings = flow.DEFAULT_FLOW
    out = np.empty((2 * settings.stack, 224, 224), np.float32)
    rgb_out = np.empty((3, 224, 224), np.float32)

    def decode():
        for path, _ in clips:
            for _ in video.iter_frames(path):
                pass

    def rgb_stream():
        for path, _ in clips:
            for frame in video.iter_frames(path):
                preprocessing.preprocess_frame(frame, 224, out=rgb_out)

    def flow_stream():
        for path, _ in clips:
            for _, planes in flow.clip_stacks(video.iter_frames(path), settings, 224):
                flow.stacked(planes, out)
    times = alternating_rounds(dict(decode=decode, rgb=rgb_stream, flow=flow_stream), rounds)
    figures.update(frames=n_frames, default=settings._asdict(),
                   **{f'{name}_fps': n_frames / min(t) for name, t in times.items()})
    return figures


def flow_sampling_rate(folder, lists, samples):
    """Fine-tuning's random samples per second in one process: the flow stream's stacks beside RGB frames, each
    clip's packets probed first (as fine-tuning does before its loaders fork)."""
    from helperFunctions import read_split
    from ucf.flow import DEFAULT_FLOW
    from ucf.frame_dataset import RandomFrameDataset
    clips = read_split(lists, 1, 'train')
    order = np.random.RandomState(0).randint(0, len(clips), samples)
    rates = {}
    for name, settings in (('rgb', None), ('flow', DEFAULT_FLOW)):
        data = RandomFrameDataset(folder, clips, 224, flow=settings)
        data.probe()
        start = time.perf_counter()
        for i in order:
            data.get_example(i)
        rates[name] = samples / (time.perf_counter() - start)
    return rates


def classify_figures(folder, strides=(1, 5)):
    """classifyVideo.py on 10 s of 320x240 video (25 fps, XVID) with models of the real sizes (VGG16 at 224x224,
    fc7 1024, 101 classes; the LSTM 1024 -> 512), random weights, on this machine's CPUs: seconds in all and by
    stage (decoding and preprocessing, the network, the LSTM, the picture, drawing, encoding), at each stride."""
    import contextlib
    import io

    import synthetic_ucf101
    import VGGNet
    import VGGNet_1024
    import classifyVideo
    import rnn
    from ucf.packed_hdf5 import FeatureStats
    from ucf.provenance import make_provenance, provenance_text
    clip = os.path.join(folder, 'ten_seconds.avi')
    if not os.path.exists(clip):
        frames = synthetic_ucf101.render_clip('SlideRight', 0, +1, 8, 252, 320, 240, np.random.RandomState(0))
        synthetic_ucf101.write_avi(clip, frames, 25.0, codec='mpeg4')
    classes = [f'Class{i:03d}' for i in range(101)]
    np.random.seed(0)
    model = VGGNet_1024.VGGNet_1024(101)
    model_path, stats_path, rnn_path = (os.path.join(folder, name) for name in ('classify_vgg.model',
                                                                                 'classify_stats.npz',
                                                                                 'classify_rnn.model'))
    VGGNet.save_model(model, model_path, {'source': 'random-init(bench)', 'classes': classes})
    digest = VGGNet_1024.load_model(model_path).provenance['digest']
    extraction = dict(step='saveFeatures_1024.py', tag='bench', model=dict(digest=digest))
    stats = FeatureStats(np.zeros(1024), np.ones(1024), 1, np.zeros(1024, bool),
                         make_provenance('normalizeData.py', input=dict(extraction=extraction)))
    stats.save(stats_path)
    trained = dict(step='normalizeData.py', input=dict(extraction=extraction),
                   statistics=dict(digest=stats.digest, frames=1))
    rnn.save_model(rnn.RNN(1024, 512, 1, 512, 101), rnn_path, provenance_text(make_provenance(
        'rnn.py', train=trained, options=dict(seqlen=120, segments=5, padding='reverse', stream='rgb'))), classes)
    figures = {}
    for stride in strides:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            video = classifyVideo.main([clip, '--model', model_path, '--stats', stats_path, '--rnn', rnn_path,
                                        '--stride', str(stride), '--out', os.path.join(folder, 'classified'),
                                        '--annotate', os.path.join(folder, f'labelled_{stride}.mp4')])[0]
        figures[stride] = dict(seconds=time.perf_counter() - start, stages=video['seconds'],
                               frames=video['frames'], classified=video['classified'])
    return figures


def sampling_rate(folder, lists, samples):
    from helperFunctions import random_augmentation, read_split
    from ucf.frame_dataset import RandomFrameDataset
    clips = read_split(lists, 1, 'train')
    data = RandomFrameDataset(folder, clips, 224, augment=random_augmentation)
    rng = np.random.RandomState(0)
    order = rng.randint(0, len(clips), samples)
    start = time.perf_counter()
    for i in order:
        data.get_example(i)
    cold = samples / (time.perf_counter() - start)  # each clip probed once (its packets), then read
    start = time.perf_counter()
    for i in order:
        data.get_example(i)
    return cold, samples / (time.perf_counter() - start)


def extraction_figures(work, conv):
    """The real extraction script on the synthetic set with a 224x224 VGG16: its frames/s."""
    import VGGNet
    import VGGNet_1024
    model_path = os.path.join(work, 'VGG_1024_224.model')
    if not os.path.exists(model_path):
        np.random.seed(0)
        VGGNet.save_model(VGGNet_1024.VGGNet_1024(8), model_path, {'source': 'random-init(bench)'})
    out = os.path.join(work, f'extract_{conv}')
    shutil.rmtree(out, ignore_errors=True)
    import saveFeatures_1024
    summary = saveFeatures_1024.main(['--data', os.path.join(work, 'UCF-101'), '--lists',
                                      os.path.join(work, 'ucfTrainTestlist'), '--subsets', 'test', '--model',
                                      model_path, '--features-dir', os.path.join(out, 'f'), '--predictions-dir',
                                      os.path.join(out, 'p'), '--log-dir', os.path.join(out, 'logs'),
                                      '--num-shards', '12', '--shard', '0', '--batchsize', '8', '--conv', conv])
    return summary['frames_per_second']


def packing_figures(work, clips_scale, real_lists):
    """save_hdf5.py and normalizeData.py on generated features: seconds and peak resident memory of each."""
    import synthetic_ucf101
    folder = os.path.join(work, 'packing')
    shutil.rmtree(folder, ignore_errors=True)
    if clips_scale != 'full':
        kwargs = dict(n_classes=10)
    elif os.path.isfile(os.path.join(real_lists, 'classInd.txt')):
        kwargs = dict(lists=real_lists)  # the real 13,320 clip names, classes and splits
    else:
        kwargs = {}
    start = time.perf_counter()
    n_clips, n_frames = synthetic_ucf101.write_fake_features(folder, **kwargs)
    generate = time.perf_counter() - start
    figures = dict(clips=n_clips, frames=int(n_frames), generate_s=round(generate, 1))
    # The reference: copying the same features (cp -r), the least that rewriting them can cost.
    start = time.perf_counter()
    subprocess.run(['cp', '-r', os.path.join(folder, 'UCF-101_features'), os.path.join(folder, 'copy')], check=True)
    subprocess.run(['sync'])
    figures['copy_s'] = round(time.perf_counter() - start, 1)
    shutil.rmtree(os.path.join(folder, 'copy'))
    for script in ('save_hdf5.py', 'normalizeData.py'):
        # GNU time reports the peak memory of the script and the writer it forks. (A peak read here with
        # wait4 would include this benchmark's own memory: the kernel carries it across fork and exec.)
        timer = ['/usr/bin/time', '-f', 'peak_kb=%M'] if os.path.exists('/usr/bin/time') else []
        start = time.perf_counter()
        result = subprocess.run([*timer, sys.executable, os.path.join(ROOT, script)], cwd=folder,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            raise RuntimeError(f'{script} failed in {folder}: {result.stderr[-500:]}')
        peak = round(int(result.stderr.rsplit('peak_kb=', 1)[1].split()[0]) / 1024) if timer else 'unknown'
        figures[script] = dict(seconds=round(time.perf_counter() - start, 1), peak_mb=peak)
    figures['hdf5_gb'] = round(sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                   if f.endswith('.hdf5')) / 1e9, 2)
    shutil.rmtree(folder, ignore_errors=True)
    return figures


def _varint(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# V1LayerParameter.LayerType of the layers VGG_ILSVRC_16_layers.caffemodel holds
V1_TYPES = {'Convolution': 4, 'InnerProduct': 14, 'ReLU': 18}


def write_caffemodel(path, layers, layout='old'):
    """A caffemodel of `layers` [(name, type, [arrays])], byte for byte what Caffe's protobuf writes, streamed
    (the floats go straight from numpy to the file). layout 'old': `layers` with num/channels/height/width, as
    VGG_ILSVRC_16_layers.caffemodel; 'new': `layer` with shape.dim."""
    def blob_head(array):
        if layout == 'old':
            dims = (1,) * (4 - array.ndim) + array.shape
            head = b''.join(_varint(n << 3) + _varint(d) for n, d in zip((1, 2, 3, 4), dims))
            return head + _varint(5 << 3 | 2) + _varint(array.nbytes), b''
        shape = _field(7, _field(1, b''.join(_varint(d) for d in array.shape)))
        return _varint(5 << 3 | 2) + _varint(array.nbytes), shape

    with open(path, 'wb') as f:
        f.write(_field(1, b'VGG_ILSVRC_16_layers'))
        for name, kind, arrays in layers:
            if layout == 'old':
                head = _field(4, name.encode()) + _varint(5 << 3) + _varint(V1_TYPES[kind])
            else:
                head = _field(1, name.encode()) + _field(2, kind.encode())
            blobs = [(blob_head(a), np.ascontiguousarray(a, '<f4')) for a in arrays]
            blob_sizes = [len(h) + a.nbytes + len(tail) for (h, tail), a in blobs]
            size = len(head) + sum(len(_varint(s)) + 1 + s for s in blob_sizes)
            f.write(_varint((2 if layout == 'old' else 100) << 3 | 2) + _varint(size) + head)
            for ((h, tail), a), s in zip(blobs, blob_sizes):
                f.write(_varint((6 if layout == 'old' else 7) << 3 | 2) + _varint(s) + h)
                a.tofile(f)
                f.write(tail)


def vgg16_layers(rng, insize=224, widths=None, fc=4096, classes=1000):
    """[(name, type, [W, b])] of VGG16 with random weights, ReLUs between, as the caffemodel lists them."""
    import VGGNet
    shapes = VGGNet.expected_shapes(insize, widths or VGGNet.WIDTHS, fc, classes)
    layers = []
    for name in VGGNet.CONV_LAYERS + VGGNet.FC_LAYERS:
        arrays = [rng.standard_normal(shapes[f'{name}/{k}'], np.float32) for k in 'Wb']
        layers += [(name, 'Convolution' if name.startswith('conv') else 'InnerProduct', arrays),
                   (f'relu_{name}', 'ReLU', [])]
    return layers


def caffemodel_figures(work):
    """VGGNet.py --from-caffemodel on a file of VGG_ILSVRC_16_layers.caffemodel's size and layout (553 MB, old
    `layers`): seconds and peak memory (GNU time), and whether every weight came through bit for bit."""
    import VGGNet
    path, out = os.path.join(work, 'VGG_ILSVRC_16_layers.caffemodel'), os.path.join(work, 'VGG.model')
    layers = vgg16_layers(np.random.default_rng(0))
    write_caffemodel(path, layers)
    timer = ['/usr/bin/time', '-f', 'peak_kb=%M'] if os.path.exists('/usr/bin/time') else []
    start = time.perf_counter()
    result = subprocess.run([*timer, sys.executable, os.path.join(ROOT, 'VGGNet.py'), '--from-caffemodel', path,
                             '-o', out], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f'VGGNet.py --from-caffemodel failed: {result.stderr[-500:]}')
    params = VGGNet.read_params(out)
    exact = all(np.array_equal(params[f'{name}/{k}'], a.reshape(params[f'{name}/{k}'].shape))
                for name, _, arrays in layers for k, a in zip('Wb', arrays))
    figures = dict(megabytes=round(os.path.getsize(path) / 1e6), seconds=round(seconds, 1), exact=exact,
                   peak_mb=round(int(result.stderr.rsplit('peak_kb=', 1)[1].split()[0]) / 1024) if timer else None)
    os.unlink(path)
    os.unlink(out)
    return figures


STACK_CODE = r'''
import json, platform, sys
sys.path.insert(0, sys.argv[1])
import numpy
from tools import bench
from ucf import fast_conv
repeat = int(sys.argv[2])
print(json.dumps(dict(python=platform.python_version(), numpy=numpy.__version__, blas=fast_conv.blas_in_use(),
                      sgemm_gflops=bench.sgemm_gflops(repeat), fps_b1=bench.vgg_fps('fast', 1, repeat),
                      fps_b8=bench.vgg_fps('fast', 8, repeat))))
'''


def stack_figures(pythons, rounds, repeat):
    """fast_conv's VGG16 forward and the BLAS it multiplies with, under each interpreter (each stack's venv), in
    alternating rounds; the best round of each."""
    best = {}
    for _ in range(rounds):
        for python in pythons:
            out = subprocess.run([python, '-c', STACK_CODE, ROOT, str(repeat)], capture_output=True, text=True)
            if out.returncode:
                best[python] = {'error': out.stderr.strip()[-300:]}
                continue
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            kept = best.setdefault(python, figures)
            for key in ('sgemm_gflops', 'fps_b1', 'fps_b8'):
                kept[key] = max(kept[key], figures[key])
    return best


def stacks_report(stacks):
    lines = ['fast_conv on each stack, measured in alternating rounds in one run', '',
             '| Python | numpy | BLAS | float32 matmul | VGG16 224 forward, batch 1 | batch 8 |',
             '|---|---|---|---|---|---|']
    first = None
    for python, f in stacks.items():
        if 'error' in f:
            lines.append(f'| {python} | failed: {f["error"]} | | | | |')
            continue
        first = first or f
        speeds = ' | '.join(f'{f[k]:.2f} frames/s ({f[k] / first[k]:.2f}x)' for k in ('fps_b1', 'fps_b8'))
        lines.append(f'| {f["python"]} | {f["numpy"]} | {f["blas"] or "none: the stacking path"} | '
                     f'{f["sgemm_gflops"]:.0f} GFLOP/s | {speeds} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', '-o', default='bench')
    p.add_argument('--work', default=None, help='scratch folder (default: a temporary one)')
    p.add_argument('--quick', action='store_true', help='small packing scale and fewer repetitions')
    p.add_argument('--no-torch', action='store_true', help='skip the PyTorch peer')
    p.add_argument('--lists', default=os.path.join(ROOT, '..', 'shared', 'ucfTrainTestlist'),
                   help="the real split files, whose 13,320 clip names the full-scale packing uses (default: "
                        "%(default)s; generated names where absent)")
    p.add_argument('--stacks', nargs='+', metavar='PYTHON', default=[],
                   help="interpreters of each stack's venv (e.g. .venv/bin/python .venv-other/bin/python): "
                        "fast_conv's speed under each, side by side (make bench passes both where it finds them)")
    p.add_argument('--only', nargs='+', choices=('decoding', 'flow', 'classify', 'lstm', 'evaluation', 'packing',
                                                 'stacks'),
                   help='measure these again and update the existing results (bench/results.json)')
    p.add_argument('--packing-only', action='store_true', help='the same as --only packing')
    args = p.parse_args(argv)
    repeat = 2 if args.quick else 3
    rounds = 3 if args.quick else 8
    work = args.work or tempfile.mkdtemp(prefix='ucf_bench_')
    only = set(args.only or []) | ({'packing'} if args.packing_only else set())
    if only and os.path.exists(os.path.join(args.out, 'results.json')):
        with open(os.path.join(args.out, 'results.json')) as f:
            r = json.load(f)
    elif only - {'stacks', 'flow', 'classify'}:
        raise SystemExit(f'--only needs the results of a whole run in {args.out}/results.json: run `make bench` first')
    else:
        os.makedirs(args.out, exist_ok=True)
        r = {}
    r['machine'] = dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                        python=platform.python_version())
    if not only or only & {'decoding', 'flow'}:  # the synthetic clips
        import synthetic_ucf101
        if not os.path.isdir(os.path.join(work, 'UCF-101')):
            synthetic_ucf101.make_dataset(work, n_classes=8, frames=(60, 200), clips_per_group=(1, 1))
    if not only:
        print('matrix multiply ...', file=sys.stderr, flush=True)
        r['sgemm_gflops'] = sgemm_gflops(repeat)
        print('VGG16 forward, Chainer and PyTorch ...', file=sys.stderr, flush=True)
        r['torch'] = vgg_figures(r, repeat, 2 if args.quick else 3, not args.no_torch)
        r['vgg_ceiling_fps'] = r['sgemm_gflops'] / VGG16_GFLOP
        for conv in ('stock', 'fast'):
            r[f'finetune_{conv}_step_s_b8'] = finetune_step_seconds(conv, 8, repeat)
    if not only or 'decoding' in only:
        print('decoding ...', file=sys.stderr, flush=True)
        r['decoding'] = decoding_figures(os.path.join(work, 'UCF-101'), rounds)
    if not only or 'flow' in only:
        print('optical flow ...', file=sys.stderr, flush=True)
        r['flow'] = flow_figures(work, rounds)
        r['flow']['samples_per_s'] = flow_sampling_rate(os.path.join(work, 'UCF-101'),
                                                        os.path.join(work, 'ucfTrainTestlist'), 40 if args.quick else 120)
    if not only or 'classify' in only:
        print('classifying 10 s of video ...', file=sys.stderr, flush=True)
        r['classify'] = classify_figures(work)
    if not only:
        r['sample_cold_per_s'], r['sample_warm_per_s'] = sampling_rate(
            os.path.join(work, 'UCF-101'), os.path.join(work, 'ucfTrainTestlist'), 60 if args.quick else 200)
        print('extraction ...', file=sys.stderr, flush=True)
        r['extract_fast_fps'] = extraction_figures(work, 'fast')
        r['extract_stock_fps'] = extraction_figures(work, 'stock')
    if not only or 'lstm' in only:
        print('LSTM, Chainer and PyTorch ...', file=sys.stderr, flush=True)
        r['lstm'] = lstm_figures(rounds, not args.no_torch)
    if not only or 'evaluation' in only:
        print('LSTM evaluation ...', file=sys.stderr, flush=True)
        r['evaluation'] = evaluation_figures(64 if args.quick else 256, repeat)
    if not only or 'packing' in only:
        print('packing ...', file=sys.stderr, flush=True)
        r['packing'] = packing_figures(work, 'small' if args.quick else 'full', args.lists)
    if not only:
        print('caffemodel conversion (553 MB) ...', file=sys.stderr, flush=True)
        r['caffemodel'] = caffemodel_figures(work)
    if args.stacks and (not only or 'stacks' in only):
        print('fast_conv on each stack ...', file=sys.stderr, flush=True)
        r['stacks'] = stack_figures(args.stacks, 2, repeat)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return write_results(args.out, r)


def write_results(out, r):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(r, f, indent=1)
    table = ((report(r) + '\n' if 'sgemm_gflops' in r else '') + (stacks_report(r['stacks']) + '\n' if r.get('stacks') else '')
             + (flow_report(r['flow']) + '\n' if r.get('flow') else '')
             + (classify_report(r['classify'], r['machine']['cpus']) if r.get('classify') else ''))
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(table)
    print(table)
    return r


def classify_report(c, cpus):
    """classifyVideo.py's table: seconds per 10 s of 320x240 video, by stage, at each stride."""
    stages = ['decode and inputs', 'network', 'LSTM', 'picture', 'drawing', 'encoding']
    lines = [f'classifyVideo.py on 10 s of 320x240 video (25 fps), VGG16 at 224x224 and the LSTM of the real sizes, '
             f'{cpus} CPU cores, --annotate', '', '| stride | frames classified | seconds | '
             + ' | '.join(stages) + ' | the rest (loading the models) |', '|---:|---:|---:|' + '---:|' * (len(stages) + 1)]
    for stride, f in c.items():
        rest = f['seconds'] - sum(f['stages'].values())
        lines.append(f'| {stride} | {f["classified"]} of {f["frames"]} | {f["seconds"]:.1f} | '
                     + ' | '.join(f'{f["stages"].get(s, 0):.1f}' for s in stages) + f' | {rest:.1f} |')
    return '\n'.join(lines) + '\n'


def flow_report(f):
    """The flow stream's table: each algorithm beside decoding, and the stream's frames/s beside RGB's."""
    default = f['default']
    lines = ['Optical flow (ucf/flow.py), one thread, synthetic motion clips at 320x240 (XVID), endpoint error (px) '
             'against the motion the generator drew', '',
             '| algorithm | ms a field at 320x240 | fields/s | EPE, all pixels | EPE, moving pixels | at 224x224: all | '
             'moving |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, a in f['algorithms'].items():
        mark = ' (default)' if name == default['algorithm'] else ''
        lines.append(f'| {name}{mark} | {a["ms_per_field"]:.2f} | {1e3 / a["ms_per_field"]:.0f} | {a["epe"]:.2f} | '
                     f'{a["epe_moving"]:.2f} | {a["epe_224"]:.2f} | {a["epe_224_moving"]:.2f} |')
    samples = f.get('samples_per_s', {})
    lines += ['', f'Decoding alone: {f["decode_fps"]:.0f} frames/s (one thread). The streams\' inputs at 224x224 on '
              'one core, decoding included:', '',
              '| stream | input | frames/s per core | fine-tuning samples/s, one process |', '|---|---|---:|---:|',
              f'| rgb | preprocess_frame (3 x 224 x 224) | {f["rgb_fps"]:.0f} | {samples.get("rgb", 0):.1f} |',
              f'| flow | {default["algorithm"]}, stacks of {default["stack"]} fields ({2 * default["stack"]} x 224 x '
              f'224) | {f["flow_fps"]:.0f} | {samples.get("flow", 0):.1f} |']
    return '\n'.join(lines) + '\n'


def report(r):
    t = r.get('torch') or {}
    rows = [('float32 matrix multiply (4096^3)', f'{r["sgemm_gflops"]:.0f} GFLOP/s', 'reference', '')]
    best = max(r['vgg_fast_fps_b1'], r['vgg_fast_fps_b8'])
    for conv, batches in VGG_BATCHES:
        for b in batches:
            fps = r[f'vgg_{conv}_fps_b{b}']
            peer = t.get(f'vgg_fps_b{b}')
            rows.append((f'VGG16 224x224 forward, {conv} conv, batch {b}', f'{fps:.2f} frames/s',
                         f'{fps / r["vgg_ceiling_fps"]:.2f} of the matmul ceiling ({r["vgg_ceiling_fps"]:.1f})',
                         f'{fps / peer:.2f}x PyTorch ({peer:.2f})' if peer else ''))
    for conv in ('stock', 'fast'):
        step = r[f'finetune_{conv}_step_s_b8']
        rows.append((f'fine-tuning step, batch 8, fc7+fc8 learn, {conv} conv', f'{step:.2f} s',
                     f'{8 / step:.2f} frames/s; the handout\'s batch of 36 takes about {36 * step / 8:.0f} s', ''))
    rows.append(('fast conv vs stock (best batch)', f'{best / max(r["vgg_stock_fps_b1"], r["vgg_stock_fps_b8"]):.2f}x',
                 'same function, float32 rounding', ''))
    dc = r['decoding']
    rows.append(('decoding + preprocessing to 224 (v2: FFmpeg\'s scaler)', f'{dc["v2_fps"]:.0f} frames/s',
                 f'{dc["v2_fps"] / dc["bare_fps"]:.2f} of bare ffmpeg decoding ({dc["bare_fps"]:.0f}; median of '
                 f'rounds {dc["v2_of_bare_median"]:.2f}); {dc["v2_fps"] / dc["v1_fps"]:.2f}x v1', ''))
    rows.append(('decoding + preprocessing to 224 (v1: Pillow resize)', f'{dc["v1_fps"]:.0f} frames/s',
                 f'{dc["v1_fps"] / dc["bare_fps"]:.2f} of bare ffmpeg decoding; v2 differs from it by '
                 f'{dc["v2_v1_mean_abs"]:.3f} on average, at most {dc["v2_v1_max_abs"]:.0f} '
                 f'({dc["v2_v1_share_differing"]:.0%} of the values)', ''))
    rows.append(('random training frame + preprocessing, first visit', f'{r["sample_cold_per_s"]:.1f} samples/s',
                 'one probe of the packets + one exact read per sample, one process', ''))
    rows.append(('random training frame + preprocessing, probe cached', f'{r["sample_warm_per_s"]:.1f} samples/s',
                 'AVI: decoded from the start to the frame, converting only it', ''))
    slower = min(dc['v2_fps'], r['vgg_fast_fps_b8'])
    rows.append(('extraction pipeline (fast conv, batch 8)', f'{r["extract_fast_fps"]:.2f} frames/s',
                 f'{r["extract_fast_fps"] / slower:.2f} of its slower stage ({slower:.2f})', ''))
    rows.append(('extraction pipeline (stock conv, batch 8)', f'{r["extract_stock_fps"]:.2f} frames/s', '', ''))
    ls = r['lstm']
    peer = (f'{ls["torch_lstm_step_s"] / ls["lstm_step_s"]:.2f}x PyTorch\'s speed ({ls["torch_lstm_step_s"]:.2f} s; '
            f'median of {ls["rounds"]} alternating rounds {ls["speed_ratio_median"]:.2f}x)'
            if 'torch_lstm_step_s' in ls else '')
    rows.append(('LSTM training step, 32 x 120 x 1024 -> 512, BPTT 30, Adam', f'{ls["lstm_step_s"]:.2f} s',
                 f'median {ls["lstm_step_median_s"]:.2f} s', peer))
    ev = r.get('evaluation')
    if ev:
        rows.append((f'LSTM test evaluation, full + segments, {ev["clips"]} clips of UCF-101 lengths',
                     f'{ev["seconds"]:.1f} s', f'{ev["unshared_seconds"] / ev["seconds"]:.2f}x faster than without '
                     f'the shared projection (same scores to {ev["max_abs_difference"]:.0e}); split 1\'s 3,783 test '
                     f'clips: ~{ev["split1_test_seconds"]:.0f} s an epoch', ''))
    pk = r['packing']
    for script in ('save_hdf5.py', 'normalizeData.py'):
        copy = (f'{pk[script]["seconds"] / pk["copy_s"]:.2f}x the time of `cp -r` of the features '
                f'({pk["copy_s"]} s); ' if pk.get('copy_s') else '')
        rows.append((f'{script}, {pk["clips"]:,} clips / {pk["frames"]:,} frames', f'{pk[script]["seconds"]} s',
                     f'{copy}peak memory {pk[script]["peak_mb"]} MB', ''))
    cm = r.get('caffemodel')
    if cm:
        rows.append((f'VGGNet.py --from-caffemodel, {cm["megabytes"]} MB (the real file\'s layout)',
                     f'{cm["seconds"]} s', f'peak memory {cm["peak_mb"]} MB; bit-exact: {cm["exact"]}', ''))
    version = t.get('version') or ls.get('torch_version')
    lines = [f'Benchmarks on {r["machine"]["cpus"]} CPUs ({r["machine"]["processor"]}), Python '
             f'{r["machine"]["python"]}' + (f', PyTorch {version}' if version else ', no PyTorch peer'), '',
             '| measure | value | against | peer |', '|---|---|---|---|']
    lines += [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
