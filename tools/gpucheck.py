"""The GPU check: does the pipeline compute on this GPU what it computes on the CPU, and how fast is it? One
command on a new GPU node (or a lent machine with no network), one report.

    make gpu-bundle                              # here, with network: gpu_bundle/ (wheels + pre-encoded clips)
    python tools/gpucheck.py --bundle gpu_bundle       # on the GPU node: writes gpucheck/report.md and report.json
    python tools/gpucheck.py --device @numpy --small   # the same checks on the CPU at small sizes (part of make test)

Correctness, the device against the CPU (float32, TF32 off on both sides), each within --tolerance of the CPU's
largest value: VGG16 forward at 224x224 (fc7 feature and softmax), a fine-tuning step's gradients (every layer
learning), an LSTM training update (loss, every gradient, the parameters after Adam), the features and softmax
of a small extraction shard (saveFeatures_1024.py on both), and a few rnn.py iterations (the saved rnn.model).
On the CPU (--device @numpy) the device side runs Chainer's stock convolutions and the reference fast_conv, so
the check compares two real implementations there too.

Speed, each beside its peer in the same run: VGG16 forward frames/s at batch 32/64/128 against the same network
in PyTorch (torchvision's VGG16 with fc7 -> 1024 and fc8 -> 101, fp32); fine-tuning samples/s at batch 36 from
frameBasedTrain.py with its loader processes on the bundle's XVID clips; extraction frames/s end to end from
saveFeatures_1024.py with its decoder threads, beside the decoding alone and the network alone; the LSTM
training step at the handout's size against PyTorch's (cuDNN) LSTM; the GPU memory each one held at its peak.
Where a target is missed, the report says where the time goes (Chainer's time by function, and which stage of
extraction is the slower).

On a node without Chainer or PyAV (a lent machine with only numpy, CuPy and PyTorch), the bundle's wheels are
installed into OUT/site (--site) and the check restarts itself with them; nothing is downloaded.
"""
import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: its steps and ucf/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np

BUNDLE_PACKAGES = {  # import name: what to install from the bundle's wheels when it does not import
    'chainer': 'chainer', 'av': 'av', 'pkg_resources': 'setuptools', 'filelock': 'filelock',
    'typing_extensions': 'typing_extensions', 'six': 'six', 'google.protobuf': 'protobuf'}
WHEELS = ['chainer==7.8.1', 'av==18.1.0', 'setuptools==80.9.0', 'filelock', 'typing_extensions', 'six',
          'protobuf']  # the last four at the versions installed here
TARGETS = dict(extraction_fps=1500, vgg_vs_torch=0.5)
SIZES = {  # the handout's sizes, and small ones for a CPU run in the test suite
    'full': dict(insize=224, widths=(64, 128, 256, 512, 512), fc6=4096, feature=1024, classes=101,
                 vgg_batches=(32, 64, 128), finetune_batch=36, finetune_epochs=10, lstm=(32, 120, 1024, 512, 30),
                 correctness_batch=4, clips=dict(classes=8, per_class=2, frames=(80, 160), width=320, height=240)),
    'small': dict(insize=32, widths=(8, 16, 16, 32, 32), fc6=64, feature=32, classes=101, vgg_batches=(4, 8),
                  finetune_batch=8, finetune_epochs=2, lstm=(4, 12, 32, 16, 6), correctness_batch=2,
                  clips=dict(classes=4, per_class=1, frames=(12, 20), width=96, height=72)),
}


# ----------------------------------------------------------------------------------------------------------
# The bundle: wheels and pre-encoded clips for a node without network or an encoder
# ----------------------------------------------------------------------------------------------------------

def make_bundle(out, small=False, wheels=True, platform_tag=None):
    """Writes `out`/wheels (what Chainer and the decoder need, for CPython >= 3.11 on this platform: abi3 wheels) and
    `out`/dataset (a synthetic UCF-101 of XVID clips with B-frames: every class's clips, and one list entry per
    clip of UCF-101's 25 groups that stands in by one of them; see materialise). Returns its size in bytes."""
    import synthetic_ucf101
    os.makedirs(out, exist_ok=True)
    if wheels:
        download_wheels(os.path.join(out, 'wheels'), platform_tag)
    spec = SIZES['small' if small else 'full']['clips']
    scratch = tempfile.mkdtemp(prefix='gpucheck_clips_')
    try:
        synthetic_ucf101.main(['--out', scratch, '--classes', str(spec['classes']), '--groups', '25',
                               '--clips-per-group', '1', '1', '--frames', *map(str, spec['frames']),
                               '--width', str(spec['width']), '--height', str(spec['height']), '--codec', 'libxvid'])
        dataset = os.path.join(out, 'dataset')
        shutil.rmtree(dataset, ignore_errors=True)
        shutil.copytree(os.path.join(scratch, 'ucfTrainTestlist'), os.path.join(dataset, 'ucfTrainTestlist'))
        stand_ins = {}
        for folder in sorted(glob.glob(os.path.join(scratch, 'UCF-101', '*'))):
            clips = sorted(os.listdir(folder))
            kept = clips[-spec['per_class']:]  # the last groups: training clips of every split
            os.makedirs(os.path.join(dataset, 'clips', os.path.basename(folder)))
            for name in kept:
                shutil.copy(os.path.join(folder, name), os.path.join(dataset, 'clips', os.path.basename(folder)))
            for i, name in enumerate(clips):
                stand_ins[f'{os.path.basename(folder)}/{name}'] = f'{os.path.basename(folder)}/{kept[i % len(kept)]}'
        with open(os.path.join(dataset, 'stand_ins.json'), 'w') as f:
            json.dump(stand_ins, f, indent=0, sort_keys=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, '**', '*'), recursive=True)
               if os.path.isfile(p))
    print(f'gpucheck: bundle {out}: {size / 2**20:.1f} MiB ({len(stand_ins)} listed clips, '
          f'{len(set(stand_ins.values()))} distinct)', flush=True)
    return size


def download_wheels(folder, platform_tag=None):
    from importlib import metadata
    os.makedirs(folder, exist_ok=True)
    pinned = [w if '==' in w else f'{w}=={metadata.version(w)}' for w in WHEELS]
    env = dict(os.environ, PIP_BUILD_CONSTRAINT=os.path.join(ROOT, 'requirements', 'build-constraints.txt'),
               PIP_DISABLE_PIP_VERSION_CHECK='1')
    # Chainer is a source distribution: built here into a (pure Python) wheel, like everything else installed
    # there without a compiler or network.
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', folder, pinned[0]], env=env,
                   check=True)
    tag = platform_tag or f'manylinux2014_{platform.machine()}'
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '-d', folder,
                    '--python-version', '3.11', '--implementation', 'cp', '--abi', 'abi3', '--abi', 'none',
                    '--platform', tag, '--platform', tag.replace('2014', '_2_28'), '--platform', 'any',
                    *pinned[1:]], env=env, check=True)


def ensure_packages(bundle, site):
    """Installs what does not import here from the bundle's wheels into `site`, then restarts this process with
    it on the path. Returns only when everything imports."""
    site = os.path.abspath(site)
    if os.path.isdir(site) and site not in sys.path:
        sys.path.insert(0, site)
    from ucf import chainer_compat  # noqa: F401  (Chainer imports only through it on numpy 2)
    failures = {package: _import_error(name) for name, package in BUNDLE_PACKAGES.items()}
    missing = [package for package, error in failures.items() if error]
    if not missing:
        return
    wheels = os.path.join(bundle, 'wheels')
    if os.environ.get('GPUCHECK_RESTARTED') or not os.path.isdir(wheels):
        raise SystemExit('gpucheck: ' + '; '.join(f'{p} does not import ({failures[p]})' for p in missing)
                         + (f', even from {site}' if os.environ.get('GPUCHECK_RESTARTED') else
                            f', and {wheels} does not exist: make the bundle with `make gpu-bundle` on a machine '
                            'with network, or install them'))
    print(f'gpucheck: installing {", ".join(missing)} from {wheels} into {site}', flush=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--find-links', wheels,
                    '--target', site, '--upgrade', *missing], check=True)
    env = dict(os.environ, GPUCHECK_RESTARTED='1',
               PYTHONPATH=os.pathsep.join([site, ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _import_error(name):
    """None if `name` imports, else why not, in one line."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            __import__(name)
        return None
    except Exception as e:
        return f'{type(e).__name__}: {e}'.splitlines()[0][:200]


def materialise(bundle, work):
    """work/UCF-101 and work/ucfTrainTestlist from the bundle: every listed clip a symbolic link to its class's
    stand-in clip (real XVID files, decoded as UCF-101's would be; the same bytes shared by a class's groups)."""
    dataset = os.path.abspath(os.path.join(bundle, 'dataset'))
    with open(os.path.join(dataset, 'stand_ins.json')) as f:
        stand_ins = json.load(f)
    for listed, source in stand_ins.items():
        path = os.path.join(work, 'UCF-101', listed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):
            os.symlink(os.path.join(dataset, 'clips', source), path)
    lists = os.path.join(work, 'ucfTrainTestlist')
    if not os.path.isdir(lists):
        shutil.copytree(os.path.join(dataset, 'ucfTrainTestlist'), lists)
    return os.path.join(work, 'UCF-101'), lists


# ----------------------------------------------------------------------------------------------------------
# The device: synchronisation, peak memory, and the CPU reference
# ----------------------------------------------------------------------------------------------------------

class Device:
    """The chainer device under test, with a synchronisation and a peak-memory gauge (CuPy's pool, through an
    allocator that notes the bytes in use after every allocation)."""

    def __init__(self, spec):
        from ucf.flags import device_from_arg
        self.device = device_from_arg(spec)
        self.spec = str(self.device)
        self.gpu = self.device.xp is not np
        self.peak = 0
        if self.gpu:
            import cupy
            self.cupy = cupy
            self.pool = cupy.get_default_memory_pool()

            def malloc(size):
                memory = self.pool.malloc(size)
                self.peak = max(self.peak, self.pool.used_bytes())
                return memory
            cupy.cuda.set_allocator(malloc)
            self.device.use()

    def sync(self):
        if self.gpu:
            self.cupy.cuda.Device().synchronize()

    def reset_peak(self):
        if self.gpu:
            import gc
            gc.collect()
            self.pool.free_all_blocks()
            self.peak = self.pool.used_bytes()

    def peak_gib(self):
        return round(self.peak / 2**30, 2) if self.gpu else None

    def describe(self):
        info = dict(device=self.spec)
        if self.gpu:
            runtime = self.cupy.cuda.runtime
            props = runtime.getDeviceProperties(self.device.device.id)
            name = props['name']
            info.update(gpu=name.decode() if isinstance(name, bytes) else name, cupy=self.cupy.__version__,
                        cuda_runtime=runtime.runtimeGetVersion(), cuda_driver=runtime.driverGetVersion(),
                        memory_gib=round(runtime.memGetInfo()[1] / 2**30, 1))
        return info


def relative_difference(ours, reference):
    """Largest absolute difference over the reference's largest magnitude (0 for equal arrays)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        return float('inf')
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def to_cpu(array):
    import chainer
    return chainer.backends.cuda.to_cpu(array)


def device_conv(dev):
    """The --conv of the side under test: the scripts' default on a GPU (where it runs Chainer's own cuDNN or
    im2col path), Chainer's stock convolution on the CPU run (so that it is compared with fast_conv)."""
    return 'fast' if dev.gpu else 'stock'


def vgg_model(size, conv, train_from='fc7', dropout=0.5, seed=0, calibrate=True, calibration_frames=None):
    """A random VGGNet_1024 of the run's size, its units calibrated (VGGNet.calibrate_random) on Gaussian noise
    or on `calibration_frames`, so that features and softmax are of a real model's scale, not saturated (a
    softmax of logits in the thousands turns float32 rounding into differences no real model shows)."""
    import VGGNet
    import VGGNet_1024
    np.random.seed(seed)
    model = VGGNet_1024.VGGNet_1024(size['classes'], size['insize'], size['widths'], size['fc6'], size['feature'],
                                    conv=conv, train_from=train_from, dropout=dropout)
    if calibrate:
        VGGNet.calibrate_random(model, batch=2, frames=calibration_frames)
    return model


def frames(size, batch, seed):
    return np.random.RandomState(seed).normal(0, 50, (batch, 3, size['insize'], size['insize'])).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------

def check_vgg_forward(dev, size):
    reference = vgg_model(size, 'fast')
    x = frames(size, size['correctness_batch'], 1)
    prob_cpu, feature_cpu = reference.predict(x)
    model = _rebuilt(reference, size, device_conv(dev))
    model.to_device(dev.device)
    prob, feature = model.predict(dev.device.send(x))
    return [dict(check='VGG16 forward: fc7 feature', difference=relative_difference(to_cpu(feature), feature_cpu)),
            dict(check='VGG16 forward: softmax', difference=relative_difference(to_cpu(prob), prob_cpu))]


def _rebuilt(model, size, conv, train_from='fc7', dropout=0.5):
    """The same weights in a model built for another convolution implementation (chosen when a model is built)."""
    other = vgg_model(size, conv, train_from, dropout, calibrate=False)
    other.copyparams(model)
    return other


def check_finetune_gradients(dev, size):
    import chainer
    reference = vgg_model(size, 'fast', train_from='conv1_1', dropout=0.0)
    model = _rebuilt(reference, size, device_conv(dev), 'conv1_1', 0.0)
    x = frames(size, size['correctness_batch'], 2)
    t = (np.arange(len(x)) * 7 % size['classes']).astype(np.int32)

    def gradients(net, xs, ts):
        net.cleargrads()
        with chainer.using_config('train', True):
            loss = net(xs, ts)
        loss.backward()
        return float(loss.array), {name: to_cpu(p.grad) for name, p in net.namedparams()}
    loss_cpu, grads_cpu = gradients(reference, x, t)
    model.to_device(dev.device)
    loss, grads = gradients(model, dev.device.send(x), dev.device.send(t))
    worst = max(grads_cpu, key=lambda n: relative_difference(grads[n], grads_cpu[n]))
    return [dict(check='fine-tuning step: loss', difference=abs(loss - loss_cpu) / abs(loss_cpu)),
            dict(check=f'fine-tuning step: gradients of all {len(grads)} parameters',
                 difference=relative_difference(grads[worst], grads_cpu[worst]), detail=f'largest at {worst}')]


def lstm_update(dev_or_none, size, seed=0):
    """One rnn.py training update (BPTTUpdater, LeanAdam) at the given size on the device, or on the CPU
    (None): (loss, {gradient}, {parameter after the update}), and the step function for timing."""
    import chainer
    import rnn
    from ucf import fast_lstm
    batch, steps, n_in, hidden, bptt = size['lstm']
    np.random.seed(seed)
    model = rnn.RNN(n_in, hidden, 1, hidden, size['classes'])
    device = chainer.get_device('@numpy') if dev_or_none is None else dev_or_none.device
    model.to_device(device)
    optimizer = fast_lstm.LeanAdam(1e-3)
    optimizer.setup(model)
    rng = np.random.RandomState(seed)
    data = [(rng.normal(size=(steps, n_in)).astype(np.float32), np.int32(i % size['classes'])) for i in range(batch)]
    iterator = chainer.iterators.SerialIterator(data, batch, shuffle=False)
    updater = rnn.BPTTUpdater(iterator, optimizer, device, bptt)
    reporter = chainer.Reporter()
    reporter.add_observer('main', model)
    observation = {}

    def step():
        with reporter.scope(observation):
            updater.update()
    return model, observation, step


def check_lstm(dev, size):
    results = {}
    for side, target in (('cpu', None), ('device', dev)):
        model, observation, step = lstm_update(target, size)
        step()
        results[side] = (float(observation['main/loss']),
                         {n: to_cpu(p.grad) for n, p in model.namedparams()},
                         {n: to_cpu(p.array) for n, p in model.namedparams()})
    (loss_cpu, grads_cpu, params_cpu), (loss, grads, params) = results['cpu'], results['device']
    grad_worst = max(grads_cpu, key=lambda n: relative_difference(grads[n], grads_cpu[n]))
    param_worst = max(params_cpu, key=lambda n: relative_difference(params[n], params_cpu[n]))
    shape = 'x'.join(map(str, size['lstm'][:3])) + f' -> {size["lstm"][3]}, BPTT {size["lstm"][4]}'
    return [dict(check=f'LSTM update ({shape}): loss', difference=abs(loss - loss_cpu) / abs(loss_cpu)),
            dict(check='LSTM update: gradients', difference=relative_difference(grads[grad_worst],
                                                                                grads_cpu[grad_worst]),
                 detail=f'largest at {grad_worst}'),
            dict(check='LSTM update: parameters after Adam',
                 difference=relative_difference(params[param_worst], params_cpu[param_worst]),
                 detail=f'largest at {param_worst}')]


class Pipeline:
    """The real scripts on the materialised bundle: a random VGG.model and VGG_1024.model of the run's size."""

    def __init__(self, work, data, lists, size):
        import VGGNet
        from helperFunctions import read_class_index
        self.work, self.data, self.lists, self.size = work, data, lists, size
        self.vgg = os.path.join(work, 'VGG.model')
        if not os.path.exists(self.vgg):
            VGGNet.main(['--random', '--out', self.vgg, '--insize', str(size['insize']), '--widths',
                         *map(str, size['widths']), '--fc-size', str(size['fc6'])])
        self.model = os.path.join(work, 'VGG_1024.model')
        if not os.path.exists(self.model):  # as fine-tuning would make it: one output per class of the lists
            classes = len(read_class_index(lists))
            VGGNet.save_model(vgg_model(dict(size, classes=classes), 'fast', calibration_frames=self.sample_frames()),
                              self.model, {'source': 'random-init(gpucheck.py), calibrated on the clips'})

    def sample_frames(self, count=8):
        """`count` preprocessed frames, from as many clips as there are classes."""
        from ucf.preprocessing import preprocess_frame
        from ucf.video import iter_frames
        paths = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(self.data, '*', '*'))})
        out = np.empty((count, 3, self.size['insize'], self.size['insize']), np.float32)
        for i in range(count):
            for k, frame in enumerate(iter_frames(paths[i % len(paths)])):
                if k == 5 * (i // len(paths)):
                    preprocess_frame(frame, self.size['insize'], out=out[i])
                    break
        return out

    def extract(self, device, out, shards=1, extra=()):
        import saveFeatures_1024
        return saveFeatures_1024.main(['--data', self.data, '--lists', self.lists, '--model', self.model,
                                       '--features-dir', os.path.join(out, 'features'),
                                       '--predictions-dir', os.path.join(out, 'predictions'),
                                       '--log-dir', os.path.join(out, 'logs'), '--num-shards', str(shards),
                                       '--shard', '0', '--device', device, *extra])


def check_extraction(dev, pipeline):
    shards = 50  # 4 of the 200 listed clips: enough frames to compare, few enough for the CPU
    sides = {}
    for side, device in (('cpu', '@numpy'), ('device', dev.spec)):
        out = os.path.join(pipeline.work, f'extract_check_{side}')
        shutil.rmtree(out, ignore_errors=True)
        pipeline.extract(device, out, shards, ['--conv', 'fast' if side == 'cpu' else device_conv(dev)])
        sides[side] = {kind: {os.path.relpath(p, os.path.join(out, kind)): np.load(p)
                              for p in glob.glob(os.path.join(out, kind, '*', '*.npy'))}
                       for kind in ('features', 'predictions')}
    checks = []
    for kind in ('features', 'predictions'):
        cpu, ours = sides['cpu'][kind], sides['device'][kind]
        if not cpu or sorted(cpu) != sorted(ours):
            checks.append(dict(check=f'extraction shard: {kind}', difference=float('inf'),
                               detail=f'clips differ: {len(cpu)} on the CPU, {len(ours)} on the device'))
            continue
        frames_total = sum(len(a) for a in cpu.values())
        checks.append(dict(check=f'extraction shard: {kind}', difference=max(relative_difference(ours[c], cpu[c])
                                                                              for c in cpu),
                           detail=f'{len(cpu)} clips, {frames_total} frames'))
    return checks


def pack_features(pipeline, extraction):
    """save_hdf5.py and normalizeData.py on an extraction: the LSTM's input files."""
    import normalizeData
    import save_hdf5
    folder = os.path.join(pipeline.work, 'packed')
    os.makedirs(folder, exist_ok=True)
    train, test = (os.path.join(folder, f'{k}1024_norm.hdf5') for k in ('train', 'test'))
    if not os.path.exists(test):
        save_hdf5.main(['--lists', pipeline.lists, '--features-dir', os.path.join(extraction, 'features'),
                        '--predictions-dir', os.path.join(extraction, 'predictions'), '--log-dir',
                        os.path.join(extraction, 'logs'), '--out-dir', folder])
        normalizeData.main(['--train', os.path.join(folder, 'train1024.hdf5'), '--test',
                            os.path.join(folder, 'test1024.hdf5'), '--train-out', train, '--test-out', test,
                            '--stats', os.path.join(folder, 'feature_stats1024.npz')])
    return train, test


def check_rnn(dev, pipeline, extraction):
    import rnn
    train, test = pack_features(pipeline, extraction)
    small = pipeline.size is SIZES['small']
    saved = {}
    for side, device in (('cpu', '@numpy'), ('device', dev.spec)):
        out = os.path.join(pipeline.work, f'rnn_{side}')
        shutil.rmtree(out, ignore_errors=True)
        rnn.main(['--train', train, '--test', test, '--device', device, '--max-iterations', '3', '--batchsize', '8',
                  '--seqlen', '16' if small else '60', '--bptt', '8' if small else '30', '--hidden',
                  '16' if small else '128', '--fc', '16' if small else '128', '--out', out,
                  '--model-out', os.path.join(out, 'rnn.model'), '--results', os.path.join(out, 'lstm_results.npz')])
        with np.load(os.path.join(out, 'rnn.model')) as f:
            saved[side] = {k: f[k] for k in f.files if f[k].dtype.kind == 'f'}  # the weights, not the record
    worst = max(saved['cpu'], key=lambda k: relative_difference(saved['device'][k], saved['cpu'][k]))
    return [dict(check='rnn.py, 3 iterations: rnn.model', difference=relative_difference(saved['device'][worst],
                                                                                         saved['cpu'][worst]),
                 detail=f'largest at {worst}')]


# ----------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------

def speed_vgg(dev, size, repeat):
    import chainer

    from ucf.runcontrol import best_time
    rows, breakdown = [], None
    model = vgg_model(size, device_conv(dev))
    model.to_device(dev.device)
    for batch in size['vgg_batches']:
        dev.reset_peak()
        x = dev.device.send(frames(size, batch, 3))
        seconds = best_time(lambda: model.predict(x), dev.sync, repeat)
        rows.append(dict(what=f'VGG16 forward, batch {batch}', chainer=batch / seconds, unit='frames/s',
                         peak_gib=dev.peak_gib()))
        if breakdown is None:  # where the time goes, at the first batch size
            hook = chainer.function_hooks.TimerHook()
            with hook:
                model.predict(x)
                dev.sync()
            total = hook.total_time() or 1e-12
            breakdown = {name: round(entry['elapsed_time'] / total, 3)
                         for name, entry in sorted(hook.summary().items(), key=lambda e: -e[1]['elapsed_time'])}
        del x
    return rows, breakdown


def speed_finetune(dev, pipeline, loaders):
    """frameBasedTrain.py itself: samples/s between its first and last log line (loader start-up and the clips'
    probe left out), the loader processes decoding random frames of the bundle's clips."""
    import frameBasedTrain
    size = pipeline.size
    out = os.path.join(pipeline.work, 'finetune')
    shutil.rmtree(out, ignore_errors=True)
    dev.reset_peak()
    frameBasedTrain.main(['--data', pipeline.data, '--lists', pipeline.lists, '--vgg', pipeline.vgg, '--device',
                          dev.spec, '--loaderjob', str(loaders), '--batchsize', str(size['finetune_batch']),
                          '--epoch', str(size['finetune_epochs']), '--log-interval', '2', '--out', out,
                          '--model-out', os.path.join(out, 'VGG_1024.model')])
    with open(os.path.join(out, 'log')) as f:
        log = json.load(f)
    first, last = log[0], log[-1]
    seconds = last['elapsed_time'] - first['elapsed_time']
    samples = (last['iteration'] - first['iteration']) * size['finetune_batch']
    return [dict(what=f'fine-tuning, batch {size["finetune_batch"]}, {loaders} loader processes',
                 chainer=samples / seconds if seconds > 0 else None, unit='samples/s', peak_gib=dev.peak_gib(),
                 detail=f'frameBasedTrain.py, iterations {first["iteration"]}-{last["iteration"]}')]


def decoding_rate(pipeline, threads, seconds_at_most=20.0):
    """Frames/s of decoding + preprocessing alone, in `threads` threads, as extraction's decoders do."""
    import threading

    from ucf.preprocessing import preprocess_frame
    from ucf.video import iter_frames
    paths = sorted(glob.glob(os.path.join(pipeline.data, '*', '*')))
    counts, lock, start = [0], threading.Lock(), time.perf_counter()
    batch = np.empty((threads, 3, pipeline.size['insize'], pipeline.size['insize']), np.float32)

    def work(k):
        for path in paths[k::threads]:
            if time.perf_counter() - start > seconds_at_most:
                return
            n = 0
            for frame in iter_frames(path):
                preprocess_frame(frame, pipeline.size['insize'], out=batch[k])
                n += 1
            with lock:
                counts[0] += n
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counts[0] / (time.perf_counter() - start)


def speed_extraction(dev, pipeline, decoders, network):
    """saveFeatures_1024.py on every listed clip: frames/s end to end, beside decoding alone and the network alone
    (`network`: its frames/s and batch from the VGG16 rows)."""
    network_fps, network_batch = network
    out = os.path.join(pipeline.work, 'extract_speed')
    shutil.rmtree(out, ignore_errors=True)
    dev.reset_peak()
    summary = pipeline.extract(dev.spec, out, 1, ['--decoders', str(decoders)])
    fps = summary['frames_per_second']
    decode = decoding_rate(pipeline, decoders)
    slower = 'decoding + preprocessing' if decode < network_fps else 'the network'
    return [dict(what=f'extraction end to end, {decoders} decoder threads', chainer=fps, unit='frames/s',
                 peak_gib=dev.peak_gib(), target=TARGETS['extraction_fps'] if pipeline.size is SIZES['full'] else None,
                 detail=f'{summary["complete"]} clips; decoding + preprocessing alone {decode:,.0f} frames/s, '
                        f'the network alone (batch {network_batch}) {network_fps:,.0f}: {slower} is the slower '
                        'stage')], out


def speed_lstm(dev, size, repeat):
    from ucf.runcontrol import best_time
    dev.reset_peak()
    model, observation, step = lstm_update(dev, size)
    seconds = best_time(step, dev.sync, repeat)
    batch, steps, n_in, hidden, bptt = size['lstm']
    return [dict(what=f'LSTM training step, {batch} x {steps} x {n_in} -> {hidden}, BPTT {bptt}, Adam',
                 chainer=seconds * 1000, unit='ms', peak_gib=dev.peak_gib(), lower_is_better=True)]


# ----------------------------------------------------------------------------------------------------------
# The PyTorch peer: the same networks on the same GPU, in its own process (its own memory accounting)
# ----------------------------------------------------------------------------------------------------------

def peer_main(args):
    """Runs in a child process: prints one JSON line of PyTorch's figures."""
    import torch
    import torch.nn as nn
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    size = SIZES['small' if args.small else 'full']
    device = torch.device(args.peer_device)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def best(function):
        function()
        sync()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            function()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    def peak():
        if device.type != 'cuda':
            return None
        value = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return round(value, 2)
    result = dict(torch=torch.__version__, device=str(device))
    if args.peer == 'vgg':
        try:
            import torchvision
            vgg = torchvision.models.vgg16(weights=None)
            result['network'] = 'torchvision vgg16, fc7 -> 1024, fc8 -> 101'
        except Exception:
            vgg = None
        if vgg is None or size is SIZES['small']:  # the small size: the same layers at the run's widths
            layers, channels = [], 3
            for width, count in zip(size['widths'], (2, 2, 3, 3, 3)):
                for _ in range(count):
                    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                    channels = width
                layers.append(nn.MaxPool2d(2))
            flat = channels * (size['insize'] // 32) ** 2
            vgg = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, size['fc6']), nn.ReLU(),
                                nn.Linear(size['fc6'], size['feature']), nn.ReLU(),
                                nn.Linear(size['feature'], size['classes']))
            result['network'] = 'the same VGG16 layers in torch.nn'
        else:
            vgg.classifier[3] = nn.Linear(4096, size['feature'])
            vgg.classifier[6] = nn.Linear(size['feature'], size['classes'])
        model = nn.Sequential(vgg, nn.Softmax(dim=1)).to(device).eval()
        with torch.no_grad():
            for batch in size['vgg_batches']:
                x = torch.randn(batch, 3, size['insize'], size['insize'], device=device) * 50
                result[f'vgg_b{batch}'] = batch / best(lambda: model(x))
                result[f'vgg_b{batch}_peak_gib'] = peak()
                del x
    else:
        batch, steps, n_in, hidden, bptt = size['lstm']
        lstm = nn.LSTM(n_in, hidden, batch_first=True).to(device)
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.Sigmoid(), nn.Linear(hidden, size['classes'])).to(device)
        optimizer = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), 1e-3)
        x = torch.randn(batch, steps, n_in, device=device)
        t = torch.randint(0, size['classes'], (batch,), device=device)

        def step():
            state = None
            for start in range(0, steps, bptt):
                out, state = lstm(x[:, start:start + bptt], state)
                state = tuple(v.detach() for v in state)
                loss = nn.functional.cross_entropy(head(out.reshape(-1, hidden)),
                                                   t.repeat_interleave(out.shape[1]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        result['lstm_ms'] = best(step) * 1000
        result['lstm_peak_gib'] = peak()
        result['cudnn'] = bool(torch.backends.cudnn.is_available()) if device.type == 'cuda' else False
    print(json.dumps(result), flush=True)


def run_peer(kind, dev, small, repeat):
    """PyTorch's figures from a child process; {'skipped': why} without PyTorch or where it fails."""
    if _import_error('torch'):
        return {'skipped': f'PyTorch does not import here ({_import_error("torch")})'}
    spec = f'cuda:{dev.device.device.id}' if dev.gpu else 'cpu'
    command = [sys.executable, os.path.abspath(__file__), '--peer', kind, '--peer-device', spec, '--repeat',
               str(repeat)] + (['--small'] if small else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {'skipped': f'PyTorch failed: {done.stderr.strip()[-300:]}'}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# The run and its report
# ----------------------------------------------------------------------------------------------------------

def environment(dev):
    import chainer

    from ucf import chainer_compat
    from ucf import fast_conv
    info = dict(python=platform.python_version(), numpy=np.__version__, chainer=chainer.__version__,
                machine=platform.machine(), cpus=os.cpu_count(), compat=chainer_compat.applied(),
                cpu_blas=fast_conv.blas_in_use(), cudnn=bool(chainer.backends.cuda.cudnn_enabled))
    info.update(dev.describe())
    return info


def run(args):
    size = SIZES['small' if args.small else 'full']
    from ucf.runcontrol import usable_cpus
    report = dict(started=time.strftime('%Y-%m-%d %H:%M:%S'), size='small' if args.small else 'full',
                  correctness=[], speed=[], errors=[], tolerance=args.tolerance)
    dev = Device(args.device)
    report['environment'] = environment(dev)
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)  # every run from scratch: models, extractions, packed files
    os.makedirs(work)
    data, lists = materialise(args.bundle, work)
    repeat = 2 if args.small else args.repeat
    cpus = usable_cpus()

    def stage(name, function, *stage_args):
        start = time.perf_counter()
        print(f'gpucheck: {name} ...', flush=True)
        try:
            return function(*stage_args)
        except BaseException as e:  # a failing stage is reported, and the others still run
            if isinstance(e, KeyboardInterrupt):
                raise
            report['errors'].append(dict(stage=name, error=f'{type(e).__name__}: {e}'[:500],
                                         traceback=traceback.format_exc()[-2000:]))
            print(f'gpucheck: {name} FAILED: {type(e).__name__}: {e}', file=sys.stderr, flush=True)
            return None
        finally:
            report.setdefault('stage_seconds', {})[name] = round(time.perf_counter() - start, 1)

    for name, function in (('VGG16 forward', check_vgg_forward), ('fine-tuning gradients', check_finetune_gradients),
                           ('LSTM update', check_lstm)):
        report['correctness'] += stage(name, function, dev, size) or []
    pipeline = stage('random models', Pipeline, work, data, lists, size)
    if pipeline:
        report['correctness'] += stage('extraction shard', check_extraction, dev, pipeline) or []
    vgg_rows, breakdown = stage('VGG16 speed', speed_vgg, dev, size, repeat) or ([], None)
    torch_vgg = stage('PyTorch VGG16', run_peer, 'vgg', dev, args.small, repeat) or {}
    for row in vgg_rows:
        batch = int(row['what'].rsplit(' ', 1)[1])
        row.update(peer=torch_vgg.get(f'vgg_b{batch}'), peer_peak_gib=torch_vgg.get(f'vgg_b{batch}_peak_gib'),
                   target_ratio=TARGETS['vgg_vs_torch'])
    report['speed'] += vgg_rows
    report['chainer_time_by_function'] = breakdown
    report['peers'] = dict(vgg=torch_vgg)
    if pipeline:
        report['speed'] += stage('fine-tuning speed', speed_finetune, dev, pipeline, args.loaders or max(1, cpus - 2))\
            or []
        network = next((r for r in vgg_rows if r['what'].endswith(' 32')), vgg_rows[0] if vgg_rows else None)
        network_fps = (network['chainer'], network['what'].rsplit(' ', 1)[1]) if network else (0.0, '?')
        extraction = stage('extraction speed', speed_extraction, dev, pipeline, args.decoders or max(1, cpus - 2),
                           network_fps)
        if extraction:
            report['speed'] += extraction[0]
            report['correctness'] += stage('rnn.py iterations', check_rnn, dev, pipeline, extraction[1]) or []
    lstm_rows = stage('LSTM speed', speed_lstm, dev, size, repeat) or []
    torch_lstm = stage('PyTorch LSTM', run_peer, 'lstm', dev, args.small, repeat) or {}
    for row in lstm_rows:
        row.update(peer=torch_lstm.get('lstm_ms'), peer_peak_gib=torch_lstm.get('lstm_peak_gib'))
    report['speed'] += lstm_rows
    report['peers']['lstm'] = torch_lstm
    for row in report['correctness']:
        row['ok'] = bool(row['difference'] <= args.tolerance)
    report['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    return report


def ratio(row):
    if not row.get('chainer') or not row.get('peer'):
        return None
    return row['peer'] / row['chainer'] if row.get('lower_is_better') else row['chainer'] / row['peer']


def _or_dash(value):
    return '-' if value is None else value


def markdown(report):
    env = report['environment']
    lines = [f'# GPU check ({report["size"]} sizes), {report["started"]}', '',
             '## Machine', '', '| | |', '|---|---|']
    for key in ('device', 'gpu', 'memory_gib', 'cuda_runtime', 'cuda_driver', 'cupy', 'cudnn', 'python', 'numpy',
                'chainer', 'compat', 'cpu_blas', 'cpus', 'machine'):
        if key in env:
            value = ', '.join(env[key]) or 'nothing' if isinstance(env[key], list) else env[key]
            lines.append(f'| {key} | {value} |')
    lines += ['', f'## Correctness: the device against the CPU (largest difference / largest value; limit '
                  f'{report["tolerance"]:.0e})', '', '| check | difference | verdict | |', '|---|---|---|---|']
    for row in report['correctness']:
        lines.append(f'| {row["check"]} | {row["difference"]:.1e} | {"ok" if row["ok"] else "FAIL"} | '
                     f'{row.get("detail", "")} |')
    lines += ['', '## Speed, each beside its peer in the same run', '',
              '| what | Chainer | PyTorch | ratio (Chainer speed / PyTorch) | peak GPU memory, Chainer / PyTorch '
              '(GiB) | |', '|---|---|---|---|---|---|']
    for row in report['speed']:
        r = ratio(row)
        figure = (lambda v: '' if v is None else f'{v:,.1f} {row["unit"]}')
        goal = ''
        if row.get('target_ratio') and r is not None:
            goal = f' (target >= {row["target_ratio"]}: {"met" if r >= row["target_ratio"] else "NOT met"})'
        if row.get('target'):
            goal = f' (target >= {row["target"]:,}: {"met" if row["chainer"] >= row["target"] else "NOT met"})'
        lines.append(f'| {row["what"]} | {figure(row.get("chainer"))} | {figure(row.get("peer"))} | '
                     f'{"" if r is None else f"{r:.2f}x"}{goal} | {_or_dash(row.get("peak_gib"))} / '
                     f'{_or_dash(row.get("peer_peak_gib"))} | {row.get("detail", "")} |')
    for kind, peer in report.get('peers', {}).items():
        if 'skipped' in peer:
            lines.append(f'\nPyTorch peer ({kind}): skipped, {peer["skipped"]}')
        elif peer:
            lines.append(f'\nPyTorch peer ({kind}): {peer.get("torch")} on {peer.get("device")}'
                         + (f', {peer["network"]}' if 'network' in peer else '')
                         + (f', cuDNN {peer["cudnn"]}' if 'cudnn' in peer else '') + '; TF32 off')
    if report.get('chainer_time_by_function'):
        lines += ['', '## Where Chainer\'s VGG16 forward spends its time (first batch size, TimerHook)', '']
        lines += [f'- {name}: {share:.1%}' for name, share in report['chainer_time_by_function'].items()]
    lines += ['', '## Stages (seconds)', '', ', '.join(f'{k} {v}' for k, v in report.get('stage_seconds', {}).items())]
    if report['errors']:
        lines += ['', '## Errors', '']
        for e in report['errors']:
            lines += [f'- **{e["stage"]}**: {e["error"]}', '', '```', e['traceback'].strip(), '```']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', '-d', default='0', help='device to check: 0 (@cupy:0), or @numpy for the CPU run')
    p.add_argument('--bundle', default='gpu_bundle', help='the folder `make gpu-bundle` wrote')
    p.add_argument('--small', action='store_true', help='small sizes (a CPU run in the test suite)')
    p.add_argument('--out', '-o', default='gpucheck', help='folder for report.md and report.json')
    p.add_argument('--work', default=None, help='scratch folder, emptied first (default: OUT/work)')
    p.add_argument('--site', default=None, help="where the bundle's wheels are installed when needed (default: "
                                                "OUT/site)")
    p.add_argument('--tolerance', type=float, default=1e-4, help='largest relative difference to the CPU')
    p.add_argument('--repeat', type=int, default=5, help='timed runs of each measurement (the best counts)')
    p.add_argument('--loaders', type=int, default=0, help='fine-tuning loader processes (default: CPUs - 2)')
    p.add_argument('--decoders', type=int, default=0, help='extraction decoder threads (default: CPUs - 2)')
    p.add_argument('--make-bundle', metavar='DIR', help='write the bundle to DIR instead of checking')
    p.add_argument('--no-wheels', action='store_true', help='with --make-bundle: clips only')
    p.add_argument('--platform', default=None, help='with --make-bundle: the wheels\' platform, e.g. '
                                                    'manylinux2014_aarch64 (default: this machine\'s)')
    p.add_argument('--peer', choices=('vgg', 'lstm'), help=argparse.SUPPRESS)
    p.add_argument('--peer-device', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return peer_main(args)
    if args.make_bundle:
        return make_bundle(args.make_bundle, args.small, not args.no_wheels, args.platform)
    os.environ.setdefault('CUPY_TF32', '0')  # CuPy's float32 products in full precision (its default, made sure)
    os.environ.setdefault('CHAINER_WARN_VERSION_MISMATCH', '0')
    if not os.path.isdir(os.path.join(args.bundle, 'dataset')):
        raise SystemExit(f'gpucheck: no bundle at {args.bundle}/dataset; make it with `make gpu-bundle` (or '
                         f'`python tools/gpucheck.py --make-bundle {args.bundle}`) and bring it along')
    ensure_packages(args.bundle, args.site or os.path.join(args.out, 'site'))
    args.work = args.work or os.path.join(args.out, 'work')
    report = run(args)
    from ucf.files import atomic_path
    os.makedirs(args.out, exist_ok=True)
    for name, text in (('report.json', json.dumps(report, indent=1, default=str)), ('report.md', markdown(report))):
        with atomic_path(os.path.join(args.out, name)) as tmp, open(tmp, 'w') as f:
            f.write(text)
    failed = [r['check'] for r in report['correctness'] if not r['ok']]
    print(markdown(report))
    print(f'gpucheck: {"FAILED: " + "; ".join(failed) if failed else "correct"}'
          f'{", " + str(len(report["errors"])) + " stage(s) failed" if report["errors"] else ""}; '
          f'report in {os.path.join(args.out, "report.md")}', flush=True)
    if failed or report['errors']:
        sys.exit(1)
    return report


if __name__ == '__main__':
    main()
