"""Fault injection: kills, bad clips, bad lists and paths, bad numbers, full disks, two writers.

Each test records the fault it injected and the outcome it observed; at the end the suite writes the table to
docs/FAULTS.md (README links it), so the table always says what the code did on the last run, not what we hoped.
"""
import csv
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import synthetic_ucf101
from conftest import ROOT, extraction_args
from helperFunctions import read_split
from ucf.extraction import clip_stem
from ucf.video import read_frames

RESULTS = []
TABLE = os.path.join(ROOT, 'docs', 'FAULTS.md')


def record(category, fault, step, outcome):
    outcome = re.sub(r'/\S*?/pytest-\d+/', '<tmp>/', outcome)  # the test's temporary folder, not the point
    RESULTS.append((category, fault, step, outcome.replace('|', '/').replace('\n', ' ')))


@pytest.fixture(scope='module', autouse=True)
def write_table(request):
    yield
    if not RESULTS or request.config.option.keyword or request.config.option.markexpr:
        return  # a selection of the tests would leave a partial table
    os.makedirs(os.path.dirname(TABLE), exist_ok=True)
    lines = ['# Faults tried and what happened', '',
             'Written by `tests/test_faults.py` (`make faults`, also part of `make test`) from what each test '
             'observed on its last run. Every row is a fault injected into the real scripts on the tiny '
             'synthetic set.', '', '| category | fault | step | observed outcome |', '|---|---|---|---|']
    lines += [f'| {c} | {f} | {s} | {o} |' for c, f, s, o in RESULTS]
    with open(TABLE, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def run(script, *args, cwd=None, limit_bytes=None, timeout=300):
    """Run a pipeline script; with limit_bytes, under a file-size limit (a disk that fills up)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit if limit_bytes else None)


def start(script, *args, cwd=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=sigint_as_at_a_terminal)


def error_line(result):
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error:')]
    return lines[-1] if lines else (result.stderr.strip().splitlines() or ['(nothing on stderr)'])[-1]


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def whole_files(folder):
    """Files under their final names: not the hidden temporary files, not the hidden .extractions/ manifest."""
    return [f for f in files(folder) if not any(part.startswith('.') for part in f.split(os.sep))]


def kill_when(proc, condition, extra_delay, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    time.sleep(extra_delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not finished


RNG = np.random.RandomState(int(os.environ.get('FAULT_SEED', '12345')))


# ----------------------------------------------------------------------------------------------------------
# Kills
# ----------------------------------------------------------------------------------------------------------

def sigint_as_at_a_terminal():
    """In a child: SIGINT as an interactive shell leaves it. A test run from a script's background job (or nohup)
    inherits SIGINT ignored, and Python keeps it ignored: the Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize('step,delay', [('saveFeatures_1024.py', 0.3), ('frameBasedTrain.py', 0.0),
                                        ('frameBasedTrain.py', 0.5), ('generate_pbs.py', 0.3)])
def test_ctrl_c_is_one_line(step, delay, tiny_ucf, tiny_model, small_vgg, tmp_path):
    """Ctrl-C at a terminal interrupts the whole process group (the step and its loader processes). The instant
    does not matter (tests below cover the libraries loading and an extension module's initialisation), so the
    delays only vary where it lands."""
    root, _ = tiny_ucf
    if step == 'saveFeatures_1024.py':
        args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
        started = lambda: (tmp_path / 'UCF-101_features').exists()  # noqa: E731
    elif step == 'generate_pbs.py':  # the local runner: its shards run in their own process groups
        args = ['--scheduler', 'local', '--num-shards', '2', '--parallel', '2', '--log-dir', str(tmp_path / 'jobs'),
                '--'] + extraction_args(tiny_ucf, tiny_model, str(tmp_path))
        started = lambda: (tmp_path / 'UCF-101_features').exists()  # noqa: E731
    else:
        args = ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist'),
                '--vgg', small_vgg, '--out', str(tmp_path), '--model-out', str(tmp_path / 'VGG_1024.model'),
                '--feature-size', '8', '--batchsize', '15', '--epoch', '50', '--loaderjob', '2']
        started = lambda: (tmp_path / 'log').exists()  # noqa: E731  (the loader processes are running)
    with open(tmp_path / 'err', 'wb') as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, step), *args], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, preexec_fn=sigint_as_at_a_terminal)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not started():
            time.sleep(0.05)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
    stderr = (tmp_path / 'err').read_text()
    assert code == 130 and 'Traceback' not in stderr, stderr[-2000:]
    line = [l for l in stderr.splitlines() if l.startswith('interrupted:')]
    assert line and 'Run the same command again' in line[0]
    outcome = f'exit {code}, one line: "{line[0][:90]}..."'
    if step == 'generate_pbs.py':
        assert not processes_mentioning(str(tmp_path)), 'the shards should have stopped with it'
        for log in sorted((tmp_path / 'jobs').glob('saveFeatures_*.log')):
            text = log.read_text()
            assert 'Traceback' not in text and ('interrupted:' in text or 'done:' in text), text[-2000:]
        for name in whole_files(str(tmp_path / 'UCF-101_features')):
            np.load(tmp_path / 'UCF-101_features' / name)
        outcome += '; its shards stopped each with its own line, every feature file whole'
    record('Ctrl-C', 'SIGINT to the step and its loader processes', step, outcome)


def processes_mentioning(text):
    """PIDs of the processes whose command line holds `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return found


@pytest.mark.parametrize('where', ['while the libraries load', 'an extension module initialising'])
def test_ctrl_c_at_any_instant_is_one_line(where, tmp_path):
    """A Ctrl-C before a step's main() runs (its imports take seconds on a busy node), and one that lands while an
    extension module initialises: pybind11 turns it into 'ImportError: initialization failed' caused by the
    interrupt (matplotlib's Agg backend, imported at the first plot: a fine-tuning run's traceback and exit 1).
    Both instants are made here exactly, rather than hit by chance."""
    code = ('import ucf, os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport time\ntime.sleep(30)'
            if where == 'while the libraries load' else
            'from ucf.runcontrol import exit_on_user_error\nwith exit_on_user_error():\n'
            '    try:\n        raise KeyboardInterrupt\n    except KeyboardInterrupt as e:\n'
            "        raise ImportError('initialization failed') from e\n")
    (tmp_path / 'a_step.py').write_text(code)
    result = subprocess.run([sys.executable, str(tmp_path / 'a_step.py')], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, preexec_fn=sigint_as_at_a_terminal, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 130 and len(lines) == 1 and lines[0].startswith('interrupted: a_step.py stopped'), \
        result.stderr
    record('Ctrl-C', f'SIGINT {where}', 'every step', f'exit 130, one line: "{lines[0][:60]}..."')


def test_loader_processes_start_with_ctrl_c_held(tiny_ucf, small_vgg, tmp_path):
    """A Ctrl-C at the instant fine-tuning forks its loader processes went to a child before Chainer's set-up there
    ignored SIGINT: the child died and the parent trained on. Forked with SIGINT blocked, no child can take it."""
    root, _ = tiny_ucf
    args = ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--vgg', small_vgg, '--out', str(tmp_path), '--model-out', str(tmp_path / 'VGG_1024.model'),
            '--feature-size', '8', '--batchsize', '15', '--epoch', '50', '--loaderjob', '2']
    proc = start('frameBasedTrain.py', *args)
    try:
        children, deadline = [], time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(children) < 2:
            with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
                children = f.read().split()
            time.sleep(0.05)
        assert len(children) >= 2, 'the loader processes should start'
        for child in children:
            with open(f'/proc/{child}/status') as f:
                blocked = int(next(l for l in f if l.startswith('SigBlk:')).split()[1], 16)
            assert blocked & (1 << (signal.SIGINT - 1)), f'loader {child} can take SIGINT'
    finally:
        proc.kill()
        proc.wait()
    record('Ctrl-C', 'SIGINT at the instant the loader processes fork', 'frameBasedTrain.py',
           'they are forked with SIGINT blocked (read from /proc/<pid>/status): the parent takes it, one line, 130')


@pytest.mark.parametrize('attempt', [0, 1])
def test_kill_extraction(attempt, tiny_ucf, tiny_model, extracted, tmp_path):
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    threshold = int(RNG.randint(5, 80))
    proc = start('saveFeatures_1024.py', *args)
    features = tmp_path / 'UCF-101_features'
    killed = kill_when(proc, lambda: features.exists() and len(files(features)) >= threshold, RNG.uniform(0, 0.3))
    before = whole_files(features) if features.exists() else []
    for name in before:
        np.load(features / name)  # every file under its final name is whole
    result = run('saveFeatures_1024.py', *args)
    assert result.returncode == 0, result.stderr
    for folder in ('UCF-101_features', 'UCF-101_framePrediction'):
        assert whole_files(tmp_path / folder) == whole_files(os.path.join(extracted, folder))
        for name in whole_files(tmp_path / folder):
            assert np.array_equal(np.load(tmp_path / folder / name), np.load(os.path.join(extracted, folder, name)))
    record('kill -9', f'extraction shard killed after {len(before)} of 100 clips', 'saveFeatures_1024.py',
           f'{"killed mid-run" if killed else "finished before the kill"}; all {len(before)} files whole; rerun: '
           f'{result.stderr.strip().splitlines()[-1]}; outputs equal to an uninterrupted run')


def test_kill_fine_tuning(tiny_ucf, small_vgg, tmp_path):
    root, _ = tiny_ucf
    args = ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--vgg', small_vgg, '--out', str(tmp_path), '--model-out', str(tmp_path / 'VGG_1024.model'),
            '--feature-size', '8', '--batchsize', '15', '--epoch', '4', '--snapshot-interval', '3',
            '--loaderjob', '0', '--log-interval', '5']
    proc = start('frameBasedTrain.py', *args)
    killed = kill_when(proc, lambda: any(p.startswith('snapshot') for p in os.listdir(tmp_path)),
                       RNG.uniform(0, 1.0))
    snapshots = sorted(p for p in os.listdir(tmp_path) if p.startswith('snapshot_iter_'))
    assert not (tmp_path / 'VGG_1024.model').exists() or not killed
    result = run('frameBasedTrain.py', *args, '--resume', 'auto')
    assert result.returncode == 0, result.stderr
    resumed = [l for l in result.stderr.splitlines() if l.startswith('resumed from')]
    assert resumed and (tmp_path / 'VGG_1024.model').exists()
    assert '\x1b' not in result.stdout  # plain lines in a job's log
    import VGGNet_1024
    VGGNet_1024.load_model(str(tmp_path / 'VGG_1024.model'))
    record('kill -9', f'fine-tuning killed after snapshot {snapshots[-1] if snapshots else "-"}', 'frameBasedTrain.py',
           f'rerun with --resume auto: "{resumed[0]}"; completed all 4 epochs; VGG_1024.model loads')


@pytest.fixture(scope='module')
def reference_packed(tiny_ucf, extracted, tmp_path_factory):
    out = tmp_path_factory.mktemp('reference')
    result = run('save_hdf5.py', *pack_args(tiny_ucf, extracted, out))
    assert result.returncode == 0, result.stderr
    result = run('normalizeData.py', *norm_args(out, out))
    assert result.returncode == 0, result.stderr
    return out


def pack_args(tiny_ucf, work, out):
    root, _ = tiny_ucf
    return ['--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--features-dir', os.path.join(work, 'UCF-101_features'),
            '--predictions-dir', os.path.join(work, 'UCF-101_framePrediction'),
            '--log-dir', os.path.join(work, 'extraction_logs'), '--out-dir', str(out)]


def norm_args(packed, out):
    return ['--train', str(packed / 'train1024.hdf5'), '--test', str(packed / 'test1024.hdf5'),
            '--train-out', str(out / 'train1024_norm.hdf5'), '--test-out', str(out / 'test1024_norm.hdf5'),
            '--stats', str(out / 'feature_stats1024.npz')]


def same_hdf5(a, b):
    with h5py.File(a, 'r') as f, h5py.File(b, 'r') as g:
        names = [n.decode() for n in f['_index/clips'][()]]
        return (names == [n.decode() for n in g['_index/clips'][()]]
                and all(np.array_equal(f[n][()], g[n][()]) for n in names)
                and dict(f.attrs) == dict(g.attrs))


@pytest.fixture(scope='module')
def many_features(tmp_path_factory):
    """Extraction outputs (no videos) for 3,000-odd clips, so that packing runs long enough to be killed in."""
    work = tmp_path_factory.mktemp('many')
    synthetic_ucf101.write_fake_features(str(work), n_classes=25, dim=64, frames=(10, 400), mean_frames=120)
    reference = work / 'reference'
    args = ['--lists', str(work / 'ucfTrainTestlist'), '--features-dir', str(work / 'UCF-101_features'),
            '--predictions-dir', str(work / 'UCF-101_framePrediction'), '--log-dir', str(work / 'logs')]
    assert run('save_hdf5.py', *args, '--out-dir', str(reference)).returncode == 0
    assert run('normalizeData.py', *norm_args(reference, reference)).returncode == 0
    return args, reference


@pytest.mark.parametrize('script', ['save_hdf5.py', 'normalizeData.py'])
def test_kill_packing_and_normalization(script, many_features, tmp_path):
    pack, reference = many_features
    args = pack + ['--out-dir', str(tmp_path)] if script == 'save_hdf5.py' else norm_args(reference, tmp_path)
    outputs = (['train1024.hdf5', 'test1024.hdf5', 'testPredictions1024.hdf5'] if script == 'save_hdf5.py'
               else ['train1024_norm.hdf5', 'test1024_norm.hdf5'])
    proc = start(script, *args)
    # Kill once the first temporary file exists, plus a random moment: mid-write.
    killed = kill_when(proc, lambda: any('.tmp' in f for f in os.listdir(tmp_path)), RNG.uniform(0, 0.5))
    present = [o for o in outputs if (tmp_path / o).exists()]
    for name in present:  # a final name only ever holds a complete file
        assert same_hdf5(tmp_path / name, reference / name)
    result = run(script, *args)
    assert result.returncode == 0, result.stderr
    for name in outputs:
        assert same_hdf5(tmp_path / name, reference / name)
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]
    record('kill -9', f'killed while writing ({len(present)} of {len(outputs)} files complete by then)', script,
           f'{"killed mid-run" if killed else "finished first"}; each final file present was complete; rerun: '
           'identical to an uninterrupted run, and the killed run\'s temporary file removed')


def test_kill_lstm_training(reference_packed, tmp_path):
    args = ['--train', str(reference_packed / 'train1024_norm.hdf5'),
            '--test', str(reference_packed / 'test1024_norm.hdf5'), '--out', str(tmp_path),
            '--model-out', str(tmp_path / 'rnn.model'), '--results', str(tmp_path / 'lstm_results.npz'),
            '--hidden', '8', '--fc', '8', '--seqlen', '12', '--bptt', '4', '--epoch', '6', '--batchsize', '10']
    proc = start('rnn.py', *args)
    killed = kill_when(proc, lambda: any(p.startswith('snapshot') for p in os.listdir(tmp_path)),
                       RNG.uniform(0, 0.5))
    result = run('rnn.py', *args, '--resume', 'auto')
    assert result.returncode == 0, result.stderr
    resumed = [l for l in result.stderr.splitlines() if l.startswith('resumed from')]
    assert resumed and 'epoch 6 test [full]' in result.stdout
    assert '\x1b' not in result.stdout  # a batch job's log: plain lines, no terminal control
    assert (tmp_path / 'lstm_results.npz').exists() and (tmp_path / 'rnn.model').exists()
    record('kill -9', 'LSTM training killed after its first snapshot', 'rnn.py',
           f'{"killed mid-run" if killed else "finished first"}; rerun with --resume auto: "{resumed[0]}"; '
           'completed 6 epochs, results written')


def test_resume_of_another_run_is_refused_before_loading(reference_packed, tmp_path):
    """--resume auto with another shape (--hidden) used to die in a broadcast traceback while loading weights, and
    with another extraction's features of the same size it resumed without a word."""
    from ucf.provenance import extraction_of, parse_provenance
    args = ['--out', str(tmp_path), '--model-out', str(tmp_path / 'rnn.model'), '--results', str(tmp_path / 'r.npz'),
            '--fc', '8', '--seqlen', '12', '--bptt', '4', '--epoch', '1', '--batchsize', '10']
    data = ['--train', str(reference_packed / 'train1024_norm.hdf5'), '--test',
            str(reference_packed / 'test1024_norm.hdf5')]
    assert run('rnn.py', *data, *args, '--hidden', '8').returncode == 0
    result = run('rnn.py', *data, *args, '--hidden', '16', '--epoch', '2', '--resume', 'auto')
    line = error_line(result)
    assert result.returncode == 1 and '--hidden 8 there, 16 now' in line and 'Traceback' not in result.stderr
    record('resume', 'rnn.py --resume auto with another --hidden', 'rnn.py', f'exit 1: {line[:150]}...')
    other = {}
    for kind in ('train', 'test'):  # the same features, as if another extraction had made them
        other[kind] = tmp_path / f'other_{kind}.hdf5'
        shutil.copy(reference_packed / f'{kind}1024_norm.hdf5', other[kind])
        with h5py.File(other[kind], 'a') as f:
            text = f.attrs['provenance']
            text = text.decode() if isinstance(text, bytes) else str(text)
            tag = extraction_of(parse_provenance(text))['tag']
            f.attrs['provenance'] = text.replace(tag, 'feedfacecafe')
    result = run('rnn.py', '--train', str(other['train']), '--test', str(other['test']), *args, '--hidden', '8',
                 '--epoch', '2', '--resume', 'auto')
    line = error_line(result)
    assert result.returncode == 1 and f"the features of extraction '{tag}' there, 'feedfacecafe' now" in line, line
    record('resume', "rnn.py --resume auto on another extraction's features (same size)", 'rnn.py',
           f'exit 1: {line[:160]}...')
    assert run('rnn.py', *data, *args, '--hidden', '8', '--epoch', '2', '--resume', 'auto').returncode == 0


def test_two_writers_on_one_shard(tiny_ucf, tiny_model, extracted, tmp_path):
    """Two jobs on one shard at once used to both exit 0 and leave clips whose two files came from different
    jobs (packing then refused them): the second now stops at once with one line, and the first finishes."""
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'saveFeatures_1024.py'), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / 'UCF-101_features' / '.extractions' / 'shard_00_of_01.lock'
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.02)
    second = run('saveFeatures_1024.py', *args)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    line = error_line(second)
    assert second.returncode == 1 and 'is being done right now by pid' in line, second.stderr
    for folder in ('UCF-101_features', 'UCF-101_framePrediction'):
        assert whole_files(tmp_path / folder) == whole_files(os.path.join(extracted, folder))
        for name in whole_files(tmp_path / folder):
            assert np.array_equal(np.load(tmp_path / folder / name), np.load(os.path.join(extracted, folder, name)))
    again = run('saveFeatures_1024.py', *args)  # after the first: the lock is free, every clip done
    assert again.returncode == 0 and '100 already done by this extraction' in again.stderr, again.stderr
    record('two writers', 'two extraction jobs on the same shard at once', 'saveFeatures_1024.py',
           f'the second: exit 1, "{line[:140]}..."; the first finishes, files equal to a single run')


# ----------------------------------------------------------------------------------------------------------
# Bad clips
# ----------------------------------------------------------------------------------------------------------

def encode(path, frames, fps=25.0, codec='libxvid', pix_fmt='yuv420p'):
    import imageio_ffmpeg
    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec=codec, pix_fmt_out=pix_fmt, quality=None,
                                         macro_block_size=1, ffmpeg_log_level='error')
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def lie_about_length(path, factor=10):
    """Multiply the frame count in the AVI's main and stream headers: a file that claims far more than it has."""
    data = bytearray(path.read_bytes())
    at = data.find(b'avih')
    struct.pack_into('<I', data, at + 8 + 16, struct.unpack_from('<I', data, at + 8 + 16)[0] * factor)
    at = data.find(b'strh')
    struct.pack_into('<I', data, at + 8 + 32, struct.unpack_from('<I', data, at + 8 + 32)[0] * factor)
    path.write_bytes(bytes(data))


@pytest.fixture(scope='module')
def bad_clips(tiny_ucf, tmp_path_factory):
    """A copy of the tiny set in which some listed clips are replaced by faulty files: {clip: fault}."""
    root, written = tiny_ucf
    data = tmp_path_factory.mktemp('bad') / 'UCF-101'
    shutil.copytree(os.path.join(root, 'UCF-101'), data)
    victims = iter(sorted(written)[1::7])
    rng = np.random.RandomState(0)
    faults = {}

    def victim(fault):
        rel = next(victims)
        faults[rel] = fault
        return data / rel

    path = victim('truncated to 60% (a broken download)')
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.6)])
    victim('zero bytes').write_bytes(b'')
    victim('random bytes named .avi').write_bytes(rng.bytes(20000))
    path = victim('one frame')
    encode(path, read_frames(path)[:1])
    path = victim('600 frames, far longer than the rest')
    encode(path, np.concatenate([read_frames(path)] * (600 // 12 + 1))[:600])
    path = victim('96x72 instead of 64x48')
    frames = synthetic_ucf101.render_clip('x', 0, 1, 2, 20, 96, 72, rng)
    encode(path, frames)
    path = victim('grayscale, FFV1 codec')
    gray = read_frames(path).mean(axis=3, keepdims=True).astype(np.uint8).repeat(3, axis=3)
    encode(path, gray, codec='ffv1', pix_fmt='gray')
    path = victim('odd size 63x47, MJPEG codec')
    encode(path, synthetic_ucf101.render_clip('x', 0, 1, 2, 15, 63, 47, rng), codec='mjpeg', pix_fmt='yuvj444p')
    path = victim('header claims 10x the frames it has')
    lie_about_length(path)
    path = victim('29.97 fps, H.264 codec')
    encode(path, read_frames(path), fps=29.97, codec='libx264')
    return str(data), faults


def test_bad_clips_in_extraction(bad_clips, tiny_ucf, tiny_model, tmp_path):
    data, faults = bad_clips
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    args[1] = data
    result = run('saveFeatures_1024.py', *args)
    assert result.returncode == 0, result.stderr
    summary_line = result.stderr.strip().splitlines()[-1]
    with open(tmp_path / 'extraction_logs' / 'failures_shard_00_of_01.tsv', newline='') as f:
        failures = {r['clip']: r for r in csv.DictReader(f, delimiter='\t')}
    for rel, fault in faults.items():
        feature = tmp_path / 'UCF-101_features' / (clip_stem(rel) + '.npy')
        if rel in failures:
            row = failures[rel]
            outcome = (f'{row["status"]}: {row["reason"]} (read {row["frames_read"]} of {row["frames_claimed"]})'
                       + (f'; {np.load(feature).shape[0]} frames kept' if feature.exists() else '; no file'))
            assert feature.exists() == (row['status'] == 'kept-partial')
        else:
            assert feature.exists(), f'{rel} ({fault}) neither extracted nor reported'
            decoded = len(read_frames(os.path.join(data, rel)))
            assert np.load(feature).shape == (decoded, 16)
            outcome = f'processed: {decoded} frames extracted'
        record('bad clip', fault, 'saveFeatures_1024.py', outcome)
    assert {'zero bytes', 'random bytes named .avi'} <= {faults[c] for c in failures}
    # The count comes from the packets a file holds: a header that over-states it loses nothing (the clip is
    # processed whole, above); a file cut short is kept with what decoded, and said to be cut short.
    assert 'header claims 10x the frames it has' not in {faults[c] for c in failures}
    cut = next(c for c, f in faults.items() if f.startswith('truncated'))
    assert failures[cut]['status'] == 'kept-partial' and 'cut short' in failures[cut]['reason'], failures[cut]
    counts = re.search(r'(\d+) clips complete, (\d+) kept partial, (\d+) skipped', summary_line).groups()
    assert sum(map(int, counts)) == 100, summary_line
    record('bad clip', 'all of the above in one shard', 'saveFeatures_1024.py', f'shard went on: "{summary_line}"')

    # Packing goes on without the skipped clips only when told to, and the accuracy states what it scored.
    packed = tmp_path / 'packed'
    root, _ = tiny_ucf
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(tmp_path), packed))
    assert result.returncode == 1 and not packed.exists() or not list(packed.glob('*.hdf5'))
    assert 'could not be decoded: a rerun will not change that' in result.stderr, result.stderr
    assert 'rerun the missing shards' not in result.stderr  # every missing clip here failed to decode
    record('bad clip', 'skipped clips missing at packing', 'save_hdf5.py',
           f'exit {result.returncode}: {result.stderr.strip().splitlines()[0]} (lists them with the reason)')
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(tmp_path), packed), '--skip-missing')
    assert result.returncode == 0, result.stderr
    result = run('singleFrameAccuracy.py', '--predictions', str(packed / 'testPredictions1024.hdf5'),
                 '--results', str(packed / 'r.npz'), '--out', str(packed))
    scored = [l for l in result.stdout.splitlines() if 'clips scored' in l][0]
    test_clips = {c.path for c in read_split(os.path.join(root, 'ucfTrainTestlist'), 1, 'test')}
    n_test = len(test_clips)
    skipped = sum(1 for c, r in failures.items() if r['status'] == 'skipped' and c in test_clips)
    assert int(scored.split()[2]) == n_test - skipped
    record('bad clip', 'accuracy after packing with --skip-missing', 'singleFrameAccuracy.py',
           f'"{scored}" (of {n_test} listed)')


def test_bad_clip_in_fine_tuning(bad_clips, tiny_ucf, capsys):
    from ucf.frame_dataset import RandomFrameDataset
    data, faults = bad_clips
    root, _ = tiny_ucf
    clips = read_split(os.path.join(root, 'ucfTrainTestlist'), 1, 'train') + read_split(
        os.path.join(root, 'ucfTrainTestlist'), 1, 'test')
    dataset = RandomFrameDataset(data, clips, 32)
    zero = [i for i, c in enumerate(clips) if faults.get(c.path) == 'zero bytes'][0]
    x, label = dataset.get_example(zero)
    assert x.shape == (3, 32, 32) and label == clips[zero].label
    warning = [l for l in capsys.readouterr().err.splitlines() if 'skipping unreadable clip' in l][0]
    record('bad clip', 'zero-byte clip drawn for a training batch', 'frameBasedTrain.py',
           f'"{warning}"; a frame of another clip of the same class is used')


# ----------------------------------------------------------------------------------------------------------
# Bad lists, paths and model files: one line naming the file and the fix, non-zero exit, nothing overwritten
# ----------------------------------------------------------------------------------------------------------

def copy_lists(tiny_ucf, tmp_path):
    root, _ = tiny_ucf
    lists = tmp_path / 'lists'
    shutil.copytree(os.path.join(root, 'ucfTrainTestlist'), lists)
    return lists


def edit(path, old, new):
    text = path.read_bytes()
    assert old in text
    path.write_bytes(text.replace(old, new, 1))


def bad_input_cases(tiny_ucf, small_vgg, tmp_path):
    root, _ = tiny_ucf
    data = os.path.join(root, 'UCF-101')
    cases = []
    lists = copy_lists(tiny_ucf, tmp_path / 'malformed')
    edit(lists / 'trainlist01.txt', b'.avi 1\r\n', b'.avi\r\n')
    cases.append(('malformed split line (label missing)', 'trainlist01.txt:', lists, data, small_vgg))
    lists = copy_lists(tiny_ucf, tmp_path / 'unknown')
    edit(lists / 'trainlist01.txt', b'Archery/v_Archery', b'Archer/v_Archer')
    cases.append(('unknown class in a split file', "class folder 'Archer'", lists, data, small_vgg))
    lists = copy_lists(tiny_ucf, tmp_path / 'nosplit')
    os.unlink(lists / 'trainlist01.txt')
    cases.append(('missing split file', 'trainlist01.txt: split file not found', lists, data, small_vgg))
    lists = copy_lists(tiny_ucf, tmp_path / 'empty')
    (lists / 'trainlist01.txt').write_bytes(b'')  # was a ZeroDivisionError in fine-tuning
    cases.append(('empty training list', 'trainlist01.txt lists no clips', lists, data, small_vgg))
    cases.append(('wrong data root', 'data folder not found', os.path.join(root, 'ucfTrainTestlist'),
                  str(tmp_path / 'nowhere'), small_vgg))
    cases.append(('missing VGG.model', 'VGG16 weights not found', os.path.join(root, 'ucfTrainTestlist'), data,
                  str(tmp_path / 'VGG.model')))
    (tmp_path / 'garbage.model').write_bytes(b'\x00' * 100)
    cases.append(('VGG.model not an npz', 'not a readable npz', os.path.join(root, 'ucfTrainTestlist'), data,
                  str(tmp_path / 'garbage.model')))
    import VGGNet
    other = str(tmp_path / 'VGG64.model')
    VGGNet.save_model(VGGNet.VGGNet(64, (4, 4, 8, 8, 8), 32), other, {'source': 'test'})
    cases.append(('VGG.model of another input size', 'its fc6 is for 64x64 inputs', os.path.join(
        root, 'ucfTrainTestlist'), data, other, '--insize', '32'))
    return cases


def test_bad_lists_paths_and_models(tiny_ucf, small_vgg, tmp_path):
    for fault, expected, lists, data, vgg, *extra in bad_input_cases(tiny_ucf, small_vgg, tmp_path):
        out = tmp_path / 'out'
        out.mkdir(exist_ok=True)
        (out / 'VGG_1024.model').write_bytes(b'previous result')
        result = run('frameBasedTrain.py', '--data', str(data), '--lists', str(lists), '--vgg', vgg, '--out',
                     str(out), '--model-out', str(out / 'VGG_1024.model'), '--loaderjob', '0', *extra)
        line = error_line(result)
        assert result.returncode == 1 and expected in line and line.startswith('error:'), (fault, result.stderr)
        assert len([l for l in result.stderr.splitlines() if l.startswith(('error', 'Traceback'))]) == 1
        assert (out / 'VGG_1024.model').read_bytes() == b'previous result'
        record('bad input', fault, 'frameBasedTrain.py', f'exit 1: {line}; nothing overwritten')


@pytest.mark.parametrize('script', ['frameBasedTrain.py', 'saveFeatures_1024.py', 'generate_pbs.py', 'save_hdf5.py'])
def test_skip_missing_with_nothing_left(script, tiny_ucf, small_vgg, tiny_model, tmp_path):
    """--skip-missing when no clip of the split is there (a wrong --data): fine-tuning divided by zero inside
    Chainer's iterator after warning that all of them are missing. Nothing to work on is one line."""
    root, _ = tiny_ucf
    empty = tmp_path / 'UCF-101'
    empty.mkdir()
    lists = os.path.join(root, 'ucfTrainTestlist')
    args = {'frameBasedTrain.py': ['--data', str(empty), '--lists', lists, '--vgg', small_vgg, '--out',
                                   str(tmp_path / 'out'), '--model-out', str(tmp_path / 'm.model'), '--loaderjob', '0'],
            'saveFeatures_1024.py': extraction_args(tiny_ucf, tiny_model, str(tmp_path)),
            'generate_pbs.py': ['--scheduler', 'local', '--log-dir', str(tmp_path / 'jobs'), '--',
                                *extraction_args(tiny_ucf, tiny_model, str(tmp_path))],
            'save_hdf5.py': ['--lists', lists, '--features-dir', str(tmp_path / 'features'), '--predictions-dir',
                             str(tmp_path / 'predictions'), '--out-dir', str(tmp_path / 'out')]}[script]
    if script in ('saveFeatures_1024.py', 'generate_pbs.py'):
        args[args.index('--data') + 1] = str(empty)
    result = run(script, *args, '--skip-missing', cwd=str(tmp_path))
    line = error_line(result)
    assert result.returncode == 1 and line.startswith('error: none of the') and 'Traceback' not in result.stderr, \
        result.stderr[-2000:]
    assert not list(tmp_path.rglob('*.model')) + list(tmp_path.rglob('*.hdf5')) + list(tmp_path.rglob('*.npy'))
    record('bad input', 'no clip of the split on disk, with --skip-missing', script, f'exit 1: {line}')


@pytest.mark.parametrize('script', ['normalizeData.py', 'rnn.py', 'singleFrameAccuracy.py'])
def test_truncated_hdf5_is_called_truncated(script, reference_packed, tmp_path):
    """A cut-short copy was blamed on file locks ("sblock" in HDF5's superblock message read as a lock)."""
    name = {'normalizeData.py': 'train1024.hdf5', 'rnn.py': 'train1024_norm.hdf5',
            'singleFrameAccuracy.py': 'testPredictions1024.hdf5'}[script]
    whole = (reference_packed / name).read_bytes()
    (tmp_path / name).write_bytes(whole[:len(whole) // 3])
    flag = {'normalizeData.py': '--train', 'rnn.py': '--train', 'singleFrameAccuracy.py': '--predictions'}[script]
    result = run(script, flag, str(tmp_path / name), '--results', str(tmp_path / 'r.npz'), cwd=str(tmp_path)) \
        if script != 'normalizeData.py' else run(script, flag, str(tmp_path / name), cwd=str(tmp_path))
    line = error_line(result)
    assert result.returncode == 1 and 'truncated: it holds' in line and 'LOCKING' not in line, result.stderr[-500:]
    record('bad input', f'{name} cut to a third (an unfinished copy)', script, f'exit 1: {line[:150]}...')


@pytest.mark.parametrize('script, flag', [('rnn.py', '--hidden'), ('rnn.py', '--batchsize'), ('rnn.py', '--seqlen'),
                                          ('frameBasedTrain.py', '--feature-size'), ('frameBasedTrain.py', '--batchsize'),
                                          ('saveFeatures_1024.py', '--batchsize')])
def test_sizes_that_cannot_fit_in_memory(script, flag, tiny_ucf, tiny_model, small_vgg, reference_packed, tmp_path):
    """`--hidden 1e9` and the like: "'1e9' is not a number", and written out, a MemoryError traceback (or a
    node swapping to a halt). Now: the memory they need, what is available, which flags to lower."""
    root, _ = tiny_ucf
    lists, data = os.path.join(root, 'ucfTrainTestlist'), os.path.join(root, 'UCF-101')
    args = {'rnn.py': ['--train', str(reference_packed / 'train1024_norm.hdf5'), '--test',
                       str(reference_packed / 'test1024_norm.hdf5'), '--out', str(tmp_path),
                       '--model-out', str(tmp_path / 'rnn.model'), '--results', str(tmp_path / 'r.npz')],
            'frameBasedTrain.py': ['--data', data, '--lists', lists, '--vgg', small_vgg, '--out', str(tmp_path),
                                   '--model-out', str(tmp_path / 'VGG_1024.model'), '--loaderjob', '0'],
            'saveFeatures_1024.py': [a for a in extraction_args(tiny_ucf, tiny_model, str(tmp_path))
                                     if a != '--batchsize' and a != '8']}[script]
    result = run(script, *args, flag, '1e9')
    line = error_line(result)
    assert result.returncode == 1 and re.search(r'^error: these settings need at least [\d.]+ [kMGTPE]B of memory \('
                                                r'.*' + re.escape(flag), line), result.stderr[-800:]
    assert 'available' in line and 'Traceback' not in result.stderr
    assert not list(tmp_path.glob('*.model')) and not (tmp_path / 'UCF-101_features').exists()
    record('bad input', f'{flag} 1e9', script, f'exit 1: {line[:200]}')


def narrower_copy(source, destination, dim, spoil=()):
    """A packed file like `source` (same clips, split and record) whose features keep their first `dim` columns;
    the clips of `spoil` get a NaN."""
    from ucf import packed_hdf5
    with h5py.File(source, 'r') as f:
        names = [n.decode() for n in f['_index/clips'][()]]
        items = [(n, int(f[n].attrs['label']), f[n][()][:, :dim]) for n in names]
        classes = [c.decode() for c in f['_index/classes'][()]]
        attrs = {k: f.attrs[k] for k in ('kind', 'provenance', 'split', 'subset')}
    for _, _, array in (item for item in items if item[0] in spoil):
        array[-1, 0] = np.nan
    packed_hdf5.write_packed(str(destination), items, len(items), classes,
                             **{k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()})


@pytest.mark.parametrize('script', ['normalizeData.py', 'rnn.py'])
def test_feature_sizes_that_differ(script, reference_packed, tmp_path):
    """Train and test features of different widths were refused without saying why or what to do."""
    suffix = '_norm' if script == 'rnn.py' else ''
    narrower_copy(reference_packed / f'test1024{suffix}.hdf5', tmp_path / 'test.hdf5', 8)
    data = ['--train', str(reference_packed / f'train1024{suffix}.hdf5'), '--test', str(tmp_path / 'test.hdf5')]
    outputs = {'rnn.py': ['--out', str(tmp_path), '--model-out', str(tmp_path / 'rnn.model'),
                          '--results', str(tmp_path / 'r.npz')],
               'normalizeData.py': ['--train-out', str(tmp_path / 'a.hdf5'), '--test-out', str(tmp_path / 'b.hdf5'),
                                    '--stats', str(tmp_path / 's.npz')]}[script]
    result = run(script, *data, *outputs)
    line = error_line(result)
    assert result.returncode == 1 and re.search(r'holds 16-d features but .*test\.hdf5 8-d: .*--feature-size.*'
                                                r'Extract both subsets with one model', line), result.stderr[-600:]
    record('bad input', 'train features 16-d, test features 8-d', script, f'exit 1: {line[:230]}...')


@pytest.mark.parametrize('script,given,flag', [('normalizeData.py', 'testPredictions1024.hdf5', '--test'),
                                              ('normalizeData.py', 'test1024_norm.hdf5', '--test'),
                                              ('rnn.py', 'testPredictions1024.hdf5', '--test'),
                                              ('singleFrameAccuracy.py', 'test1024_norm.hdf5', '--predictions')])
def test_packed_file_of_another_kind(script, given, flag, reference_packed, tmp_path):
    """A packed file is refused where it is opened when it holds another kind of data than the step reads: the
    predictions given as features fell through to a width mismatch, normalised features were normalised again."""
    defaults = {'normalizeData.py': ['--train', str(reference_packed / 'train1024.hdf5'), '--test',
                                     str(reference_packed / 'test1024.hdf5'), '--train-out', str(tmp_path / 'a.hdf5'),
                                     '--test-out', str(tmp_path / 'b.hdf5'), '--stats', str(tmp_path / 's.npz')],
                'rnn.py': ['--train', str(reference_packed / 'train1024_norm.hdf5'), '--test',
                           str(reference_packed / 'test1024_norm.hdf5'), '--out', str(tmp_path), '--model-out',
                           str(tmp_path / 'rnn.model'), '--results', str(tmp_path / 'r.npz')],
                'singleFrameAccuracy.py': ['--predictions', str(reference_packed / 'testPredictions1024.hdf5'),
                                           '--results', str(tmp_path / 'r.npz'), '--out', str(tmp_path)]}[script]
    args = list(defaults)
    args[args.index(flag) + 1] = str(reference_packed / given)
    result = run(script, *args)
    line = error_line(result)
    held = 'per-frame predictions' if 'Predictions' in given else 'normalised fc7 features'
    assert result.returncode == 1 and f'holds {held}, not' in line and 'pass ' in line, result.stderr[-600:]
    assert not (tmp_path / 'a.hdf5').exists() and not (tmp_path / 'r.npz').exists()
    record('bad input', f'{flag} {given} (another kind of packed file)', script, f'exit 1: {line[:200]}')


def test_lstm_says_which_test_clips_normalization_left_out(reference_packed, tmp_path):
    """normalizeData leaves out a clip holding NaN: the LSTM was scored on fewer test clips than the single-frame
    results without a word. Now the normalised file names the clips left out and rnn.py says so."""
    with h5py.File(reference_packed / 'test1024.hdf5', 'r') as f:
        victim = f['_index/clips'][0].decode()
    narrower_copy(reference_packed / 'test1024.hdf5', tmp_path / 'test1024.hdf5', 16, spoil={victim})
    result = run('normalizeData.py', '--train', str(reference_packed / 'train1024.hdf5'), '--test',
                 str(tmp_path / 'test1024.hdf5'), '--train-out', str(tmp_path / 'train_norm.hdf5'), '--test-out',
                 str(tmp_path / 'test_norm.hdf5'), '--stats', str(tmp_path / 'stats.npz'))
    assert result.returncode == 0 and '(1 left out)' in result.stderr, result.stderr
    result = run('rnn.py', '--train', str(tmp_path / 'train_norm.hdf5'), '--test', str(tmp_path / 'test_norm.hdf5'),
                 '--out', str(tmp_path), '--model-out', str(tmp_path / 'rnn.model'), '--results',
                 str(tmp_path / 'r.npz'), '--hidden', '8', '--fc', '8', '--seqlen', '12', '--epoch', '1')
    warning = [l for l in result.stderr.splitlines() if 'leaves out 1 test clips' in l]
    assert result.returncode == 0 and warning and victim in warning[0], result.stderr
    assert '; 1 left out by normalizeData.py' in result.stderr
    record('silent', 'a test clip with NaN features (left out by normalizeData)', 'rnn.py',
           f'{warning[0][:200]}...; the final line counts it too')


def test_hdf5_of_another_split(reference_packed, tmp_path):
    other = tmp_path / 'test_split2.hdf5'
    shutil.copy(reference_packed / 'test1024.hdf5', other)
    with h5py.File(other, 'a') as f:
        f.attrs['split'] = 2
    (tmp_path / 'train1024_norm.hdf5').write_bytes(b'previous result')
    args = norm_args(reference_packed, tmp_path)
    args[3] = str(other)
    result = run('normalizeData.py', *args)
    line = error_line(result)
    assert result.returncode == 1 and 'holds split 2, not 1' in line
    assert (tmp_path / 'train1024_norm.hdf5').read_bytes() == b'previous result'
    record('bad input', 'test HDF5 from another split', 'normalizeData.py', f'exit 1: {line}; nothing overwritten')
    result = run('rnn.py', '--train', str(reference_packed / 'train1024_norm.hdf5'), '--test', str(other),
                 '--out', str(tmp_path / 'r'), '--epoch', '1')
    line = error_line(result)
    assert result.returncode == 1 and 'holds split 2, not 1' in line
    record('bad input', 'test HDF5 from another split', 'rnn.py', f'exit 1: {line}')


@pytest.mark.parametrize('script,flags', [
    ('normalizeData.py', ('--train-out', '--train')), ('normalizeData.py', ('--stats', '--test')),
    ('normalizeData.py', ('--test-out', '--train-out')), ('rnn.py', ('--results', '--test')),
    ('rnn.py', ('--model-out', '--train')), ('singleFrameAccuracy.py', ('--results', '--predictions'))])
def test_no_step_writes_over_its_inputs(script, flags, reference_packed, tmp_path):
    """An output flag given an input's path (or another output's): refused before anything is read or written."""
    work = tmp_path / 'work'
    shutil.copytree(reference_packed, work)
    args = {'normalizeData.py': {'--train': 'train1024.hdf5', '--test': 'test1024.hdf5',
                                 '--train-out': 'a_norm.hdf5', '--test-out': 'b_norm.hdf5', '--stats': 's.npz'},
            'rnn.py': {'--train': 'train1024_norm.hdf5', '--test': 'test1024_norm.hdf5', '--epoch': '1',
                       '--model-out': 'rnn.model', '--results': 'r.npz', '--out': 'r'},
            'singleFrameAccuracy.py': {'--predictions': 'testPredictions1024.hdf5', '--results': 'r.npz'}}[script]
    output, victim = flags
    args[output] = args[victim]
    before = {p: (work / p).read_bytes() for p in os.listdir(work) if (work / p).is_file()}
    result = run(script, *[x for kv in args.items() for x in kv], cwd=str(work))
    line = error_line(result)
    assert result.returncode == 1 and f'{output} {args[victim]} is also {victim}' in line, result.stderr[-800:]
    assert {p: (work / p).read_bytes() for p in before} == before
    record('bad input', f'{output} given the path of {victim}', script, f'exit 1: {line}; every input intact')


@pytest.mark.parametrize('extra', [['--shard', '3'], ['--shard=3'], ['--sh', '3'], ['--num-shards', '4'],
                                   ['-d', '1']])
def test_generator_refuses_the_flags_it_sets(extra, tmp_path):
    """`generate_pbs.py -- --shard 3` made every job extract shard 3 (the last --shard wins), and exited 0."""
    result = run('generate_pbs.py', '--scheduler', 'local', '--dry-run', '--', *extra, cwd=str(tmp_path))
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and 'after --:' in line and 'saveFeatures_1024.py --shard' not in result.stdout
    record('bad input', f'generate_pbs.py -- {" ".join(extra)}', 'generate_pbs.py', f'exit 2: {line}')


# ----------------------------------------------------------------------------------------------------------
# The flow stream
# ----------------------------------------------------------------------------------------------------------

def test_models_of_the_other_stream_are_refused(tiny_ucf, tiny_model, flow_model, small_vgg, tmp_path):
    """An RGB model where a flow model is expected and the reverse; RGB-only augmentations for a flow model."""
    cases = [('a flow model without --stream flow', [], flow_model, 'is a model of the flow stream'),
             ('an RGB model with --stream flow', ['--stream', 'flow'], tiny_model, 'is a model of the rgb stream')]
    for fault, extra, model, expected in cases:
        result = run('saveFeatures_1024.py', *extraction_args(tiny_ucf, model, str(tmp_path), *extra))
        line = error_line(result)
        assert result.returncode == 1 and expected in line and '--stream' in line, result.stderr[-600:]
        assert not (tmp_path / 'UCF-101_features').exists()
        record('flow', fault, 'saveFeatures_1024.py', f'exit 1: {line[:170]}...')
    root, _ = tiny_ucf
    result = run('frameBasedTrain.py', '--stream', 'flow', '--crop', '--rotate', '--data', os.path.join(root, 'UCF-101'),
                 '--lists', os.path.join(root, 'ucfTrainTestlist'), '--vgg', small_vgg, '--out', str(tmp_path / 'o'))
    assert result.returncode == 2 and '--crop, --rotate: augmentations of RGB frames' in result.stderr
    record('flow', 'frameBasedTrain.py --stream flow --crop --rotate', 'frameBasedTrain.py',
           f'exit 2: {result.stderr.strip().splitlines()[-1][:150]}')


def test_clips_too_short_for_flow(tiny_ucf, flow_model, tmp_path):
    """A clip of one frame has no flow: the flow stream's extraction skips it and lists it, as the RGB stream does
    an unreadable clip; the clip next to it is extracted."""
    root, written = tiny_ucf
    data = tmp_path / 'UCF-101'
    shutil.copytree(os.path.join(root, 'UCF-101'), data)
    victim = sorted(written)[3]
    frames = synthetic_ucf101.render_clip('Archery', 0, 0, 2, 1, 64, 48, np.random.RandomState(0))
    synthetic_ucf101.write_avi(str(data / victim), frames, 25.0, codec='mpeg4')
    args = extraction_args(tiny_ucf, flow_model, str(tmp_path), '--stream', 'flow', '--num-shards', '1')
    args[args.index('--data') + 1] = str(data)
    result = run('saveFeatures_1024.py', *args)
    assert result.returncode == 0, result.stderr[-800:]
    with open(tmp_path / 'extraction_logs' / 'failures_shard_00_of_01.tsv', newline='') as f:
        rows = {r['clip']: r for r in csv.DictReader(f, delimiter='\t')}
    assert rows[victim]['status'] == 'skipped' and 'one frame: no motion' in rows[victim]['reason']
    assert len(whole_files(str(tmp_path / 'UCF-101_features'))) == len(written) - 1
    record('flow', 'a clip of one frame in the flow stream', 'saveFeatures_1024.py --stream flow',
           f'skipped and listed: "{rows[victim]["reason"]}"; {len(written) - 1} other clips extracted')


def test_a_clip_whose_frame_size_changes(tmp_path):
    """A stream that changes its frame size along the clip (an MPEG-TS of two encodings): both streams' inputs are
    made of every frame (each frame is resized to the network's input), and reading the clip into one array
    says why it cannot."""
    from ucf import flow, video
    from ucf.frame_dataset import RandomFrameDataset
    from helperFunctions import Clip
    ffmpeg = __import__('imageio_ffmpeg').get_ffmpeg_exe()
    parts = []
    for k, size in enumerate(('96x72', '128x96')):
        parts.append(tmp_path / f'{k}.ts')
        subprocess.run([ffmpeg, '-y', '-v', 'error', '-f', 'lavfi', '-i', f'testsrc2=size={size}:rate=25', '-frames:v',
                        '12', '-c:v', 'libx264', '-bf', '0', '-output_ts_offset', str(0.48 * k), '-f', 'mpegts',
                        str(parts[-1])], check=True)
    (tmp_path / 'A').mkdir()
    clip = tmp_path / 'A' / 'v_A_g01_c01.ts'
    clip.write_bytes(b''.join(p.read_bytes() for p in parts))
    with pytest.raises(video.VideoError, match='frame size changes at frame 12, from 96x72 to 128x96'):
        video.read_frames(str(clip))
    settings = flow.FlowSettings('dis-ultrafast', 4, 20.0, True)
    stacks = list(flow.clip_stacks(video.iter_frames(str(clip)), settings, 32))
    assert len(stacks) == 24 and all(np.isfinite(flow.stacked(p)).all() for _, p in stacks)
    data = RandomFrameDataset(str(tmp_path), [Clip('A/v_A_g01_c01.ts', 0)], 32, cache_mb=10, flow=settings)
    assert data.get_example(0)[0].shape == (8, 32, 32)
    record('flow', 'a clip whose frame size changes along it (96x72, then 128x96)', 'extraction, fine-tuning',
           'both streams read every frame (each is resized to the input); reading it into one array says why not')


def test_fusing_results_of_different_splits_or_clips(tmp_path):
    """Two-stream single frames and confusion.py --compare put together results of one split and one test list
    only."""
    first = results_file(tmp_path / 'a.npz', 'aaaa', 'single frame')
    from ucf.results import Results
    other = Results.load(first)
    other.info['split'] = 2
    other.save(str(tmp_path / 'split2.npz'))
    elsewhere = Results(['A/v_A_g09_c01', 'B/v_B_g09_c01', 'C/v_C_g09_c01'], [0, 1, 2], np.eye(3), ['A', 'B', 'C'],
                        split=1, model='lstm')
    elsewhere.save(str(tmp_path / 'clips.npz'))
    for fault, path, expected in (('another split', 'split2.npz', 'of split 2: compare results of one split'),
                                  ('other test clips', 'clips.npz', 'were scored on other test clips')):
        result = run('confusion.py', '--compare', first, str(tmp_path / path), '--out', str(tmp_path / 'report'))
        line = error_line(result)
        assert result.returncode == 1 and expected in line, result.stderr[-600:]
        record('flow', f'confusion.py --compare of results of {fault}', 'confusion.py', f'exit 1: {line[:160]}...')


def test_two_stream_predictions_of_another_split(reference_packed, tmp_path):
    """The flow stream's predictions of another split (or of other clips) cannot be paired with the RGB stream's."""
    from ucf.packed_hdf5 import PackedFile, write_packed
    source = PackedFile(str(reference_packed / 'testPredictions1024.hdf5'))
    record_text = json.dumps(dict(step='save_hdf5.py', extraction=dict(step='saveFeatures_1024.py', tag='f',
                                                                         stream='flow')))
    for fault, split, names in (('another split', 2, source.names), ('other clips', 1, source.names[1:])):
        items = [(n, int(label), source.read(i)) for i, (n, label) in enumerate(zip(source.names, source.labels))
                 if n in names]
        write_packed(str(tmp_path / 'flow.hdf5'), items, len(items), source.classes, split=split, subset='test',
                     kind='predictions', provenance=record_text)
        result = run('singleFrameAccuracy.py', '--stream', 'two-stream', '--predictions', source.path,
                     '--flow-predictions', str(tmp_path / 'flow.hdf5'), '--results', str(tmp_path / 'r.npz'),
                     '--out', str(tmp_path))
        line = error_line(result)
        assert result.returncode == 1 and ('split 2' in line if split == 2 else 'not the same ones' in line), \
            result.stderr[-600:]
        assert not (tmp_path / 'r.npz').exists()
        record('flow', f'two-stream single frames with flow predictions of {fault}', 'singleFrameAccuracy.py',
               f'exit 1: {line[:170]}...')


def test_mixing_streams_is_refused(reference_packed, tmp_path):
    """Features of the flow stream where the RGB stream's are read (and the reverse), named where they are opened."""
    from ucf.packed_hdf5 import PackedFile, write_packed
    source = PackedFile(str(reference_packed / 'test1024.hdf5'))
    flow_record = json.dumps(dict(step='save_hdf5.py', extraction=dict(step='saveFeatures_1024.py', tag='f',
                                                                         stream='flow', split=1)))
    items = [(n, int(label), source.read(i)) for i, (n, label) in enumerate(zip(source.names, source.labels))]
    write_packed(str(tmp_path / 'test_flow.hdf5'), items, len(items), source.classes, split=1, subset='test',
                 kind='features', provenance=flow_record)
    result = run('normalizeData.py', '--train', str(reference_packed / 'train1024.hdf5'), '--test',
                 str(tmp_path / 'test_flow.hdf5'), '--train-out', str(tmp_path / 'a.hdf5'), '--test-out',
                 str(tmp_path / 'b.hdf5'), '--stats', str(tmp_path / 's.npz'))
    line = error_line(result)
    assert result.returncode == 1 and "holds the flow stream's fc7 features, not the rgb stream's" in line, line
    record('flow', "the flow stream's test features beside the RGB stream's training features", 'normalizeData.py',
           f'exit 1: {line[:170]}...')


# ----------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------

def test_constant_and_non_finite_features(reference_packed, tmp_path):
    from ucf.packed_hdf5 import PackedFile, write_packed
    source = PackedFile(str(reference_packed / 'train1024.hdf5'))
    poisoned = source.names[:2]

    def items():
        for name, label, x in source.items():
            x[:, 3] = 7.0  # a dimension that never varies
            if name == poisoned[0]:
                x[0, 0] = np.nan
            if name == poisoned[1]:
                x[-1, 5] = np.inf
            yield name, label, x
    bad = tmp_path / 'train1024.hdf5'
    write_packed(str(bad), items(), len(source), source.classes, split=1, subset='train', kind='features')
    args = norm_args(reference_packed, tmp_path)
    args[1] = str(bad)
    result = run('normalizeData.py', *args)
    assert result.returncode == 0, result.stderr
    warnings = [l for l in result.stderr.splitlines() if l.startswith('warning')]
    assert any('never vary' in w for w in warnings) and sum('NaN or inf' in w for w in warnings) == 2
    with h5py.File(tmp_path / 'train1024_norm.hdf5', 'r') as f:
        names = [n.decode() for n in f['_index/clips'][()]]
        assert not set(poisoned) & set(names) and len(names) == len(source) - 2
        assert all(np.isfinite(f[n][()]).all() for n in names)
        assert all(np.all(f[n][()][:, 3] == 0) for n in names)
    record('numbers', 'a feature dimension constant over all training frames', 'normalizeData.py',
           f'"{[w for w in warnings if "never vary" in w][0]}"; std set to 1, values 0, no NaN')
    record('numbers', 'NaN in one clip, inf in another', 'normalizeData.py',
           f'both reported ("{[w for w in warnings if "NaN" in w][0][:90]}..."), left out of the statistics and '
           'the output; every value written is finite')
    # And a NaN that reaches the LSTM's input anyway (a hand-made file) stops it with the clip's name.
    result = run('rnn.py', '--train', str(bad), '--test', str(reference_packed / 'test1024_norm.hdf5'),
                 '--out', str(tmp_path / 'r'), '--epoch', '1', '--in-memory')
    line = error_line(result)
    assert result.returncode == 1 and 'NaN or inf' in line
    record('numbers', 'NaN in the features given to the LSTM', 'rnn.py', f'exit 1: {line}')


# ----------------------------------------------------------------------------------------------------------
# Disk full and unwritable output
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('script', ['save_hdf5.py', 'normalizeData.py'])
def test_disk_full(script, tiny_ucf, extracted, reference_packed, tmp_path):
    args = pack_args(tiny_ucf, extracted, tmp_path) if script == 'save_hdf5.py' else norm_args(reference_packed,
                                                                                               tmp_path)
    result = run(script, *args, limit_bytes=64 * 1024)
    line = error_line(result)
    assert result.returncode == 1 and line.startswith('error:') and 'ulimit -f' in line, result.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.hdf5')], os.listdir(tmp_path)
    record('disk full', 'files limited to 64 KiB (RLIMIT_FSIZE), known before writing', script,
           f'exit 1: {line[:160]}...; nothing written')


def test_disk_fills_during_hdf5_write(tiny_ucf, extracted, tmp_path):
    """The space check passes but the disk fills half-way: HDF5 itself then crashes its process."""
    from ucf import runcontrol
    import save_hdf5
    helperFunctions_ensure = save_hdf5.ensure_space
    save_hdf5.ensure_space = lambda path, needed: None  # as if another job took the space after the check
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old[1]))
        with pytest.raises(SystemExit) as exit_info:
            save_hdf5.main(pack_args(tiny_ucf, extracted, tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
        save_hdf5.ensure_space = helperFunctions_ensure
    line = str(exit_info.value)
    assert line.startswith('error:') and 'train1024.hdf5' in line and 'disk may be full' in line, line
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # neither a final file nor the temporary one
    assert runcontrol.exit_on_user_error
    record('disk full', 'disk fills up half-way through an HDF5 file (HDF5 crashes)', 'save_hdf5.py',
           f'the writer runs in a child process: exit 1: {line[:150]}...; no file left')


def test_unwritable_output(tiny_ucf, extracted, tmp_path):
    (tmp_path / 'afile').write_text('not a folder')
    result = run('save_hdf5.py', *pack_args(tiny_ucf, extracted, tmp_path / 'afile' / 'out'))
    line = error_line(result)
    assert result.returncode == 1 and line.startswith('error:') and 'afile' in line
    record('disk full', 'output folder cannot be created (a file is in the way)', 'save_hdf5.py',
           f'exit 1: {line[:160]}...')


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a tmpfs mounted ro): root, as CI runs, ignores permission bits."""
    folder = tmp_path / 'ro'
    folder.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(folder)],
                      capture_output=True).returncode:
        pytest.skip('cannot mount a read-only tmpfs here (needs root)')
    yield folder
    subprocess.run(['umount', str(folder)], capture_output=True)


def test_read_only_outputs_are_refused_before_the_work(reference_packed, tiny_ucf, small_vgg, read_only_folder):
    """rnn.py said "No such file or directory" at its first snapshot, frameBasedTrain.py an epoch in, save_hdf5.py
    that 1 MB was needed with 1 MB free: each now names the flag and the read-only file system at once."""
    root, _ = tiny_ucf
    cases = {
        'rnn.py': ['--train', str(reference_packed / 'train1024_norm.hdf5'), '--test',
                   str(reference_packed / 'test1024_norm.hdf5'), '--out', str(read_only_folder / 'result_lstm')],
        'frameBasedTrain.py': ['--data', os.path.join(root, 'UCF-101'), '--lists',
                               os.path.join(root, 'ucfTrainTestlist'), '--vgg', small_vgg, '--out',
                               str(read_only_folder / 'result_frame'), '--loaderjob', '0'],
        'normalizeData.py': [*norm_args(reference_packed, read_only_folder)],
    }
    cases['generate_pbs.py'] = ['--scheduler', 'local', '--log-dir', str(read_only_folder / 'jobs'), '--',
                                '--data', os.path.join(root, 'UCF-101'), '--lists',
                                os.path.join(root, 'ucfTrainTestlist'), '--model', small_vgg]
    for script, args in cases.items():
        start = time.time()
        result = run(script, *args)
        line = error_line(result)
        assert result.returncode == 1 and 'Read-only file system' in line and str(read_only_folder) in line, line
        assert time.time() - start < 30 and 'Traceback' not in result.stderr
        record('disk full', 'outputs on a read-only file system', script, f'exit 1 at once: {line[:150]}...')


def test_extraction_disk_full(tiny_ucf, tiny_model, tmp_path):
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    result = run('saveFeatures_1024.py', *args, limit_bytes=1500)
    line = error_line(result)
    assert result.returncode == 1 and 'File too large' in line, result.stderr
    leftovers = whole_files(tmp_path / 'UCF-101_features') if (tmp_path / 'UCF-101_features').exists() else []
    assert all(os.path.basename(f).startswith('.') is False for f in leftovers)
    for name in leftovers:
        np.load(tmp_path / 'UCF-101_features' / name)
    record('disk full', 'files limited to 1,500 bytes during extraction', 'saveFeatures_1024.py',
           f'exit 1: {line[:140]}...; {len(leftovers)} whole files kept, no partial one; a rerun resumes')


# ----------------------------------------------------------------------------------------------------------
# Trust: provenance, no silent reuse of another model's features, no split leak, no divergence written out
# ----------------------------------------------------------------------------------------------------------

def other_model(tiny_ucf, small_vgg, path, seed, split=None):
    """A VGG_1024.model for the tiny set other than tiny_model (other fc7/fc8), fine-tuned 'on' `split`."""
    import VGGNet
    import VGGNet_1024
    vgg, _ = VGGNet.load_vgg(small_vgg)
    record_fields = {'source': f'test seed {seed}'} if split is None else {'step': 'frameBasedTrain.py',
                                                                           'source': 'test', 'split': split}
    VGGNet.save_model(VGGNet_1024.from_vgg(vgg, n_classes=4, feature_size=16, seed=seed), str(path), record_fields)
    return str(path)


def copy_without_times(source, destination):
    """`cp -r`: contents and names, new modification times (shutil.copy keeps no times)."""
    shutil.copytree(source, destination, copy_function=shutil.copy)
    for d, _, names in os.walk(destination):
        for name in names:
            os.utime(os.path.join(d, name), ns=(1, 10 ** 18 + len(name)))  # surely not the original times


def test_features_copied_without_their_times(tiny_ucf, tiny_model, extracted, reference_packed, tmp_path):
    """Users move features between scratch and project file systems with `cp -r`: a record keyed on times alone
    disowned every clip (packing refused them, a rerun re-extracted them in silence)."""
    from ucf.extraction import ExtractionStore
    work = tmp_path / 'work'
    copy_without_times(extracted, work)
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(work), tmp_path / 'packed'))
    assert result.returncode == 0, result.stderr  # accepted: the files' content digests match the record
    for name in ('train1024.hdf5', 'test1024.hdf5', 'testPredictions1024.hdf5'):
        assert same_hdf5(tmp_path / 'packed' / name, reference_packed / name)
    store = ExtractionStore({'features': str(work / 'UCF-101_features'),
                             'predictions': str(work / 'UCF-101_framePrediction')})
    clip = read_split(os.path.join(tiny_ucf[0], 'ucfTrainTestlist'), 1, 'train')[0].path
    recorded = store.entries()[clip][store.tag_of(clip, ('features',))]
    assert store._match(clip, recorded, ('features',)) == 'same'  # checked by packing: its new time recorded
    assert store._match(clip, recorded, ('predictions',)) == 'copied'  # not packed for training: not vouched for
    result = run('saveFeatures_1024.py', *extraction_args(tiny_ucf, tiny_model, str(work), '--num-shards', '1'))
    assert result.returncode == 0 and re.search(r'(\d+) already done by this extraction \(\w+\), 0 to do',
                                                result.stderr), result.stderr
    # Checked once: the copies' times are on record now, so the next check is a stat, not a read.
    store = ExtractionStore({'features': str(work / 'UCF-101_features'),
                             'predictions': str(work / 'UCF-101_framePrediction')})
    assert store._match(clip, store.entries()[clip][store.tag_of(clip)], store.outputs) == 'same'
    record('provenance', 'features copied with `cp -r` (modification times lost)', 'save_hdf5.py, extraction',
           'packed as the originals; the rerun re-extracts nothing (content digests checked once, then stats)')
    victim = work / 'UCF-101_features' / (clip_stem(clip) + '.npy')  # then one copy edited, its size unchanged
    array = np.load(victim)
    array[0, 0] += 1
    np.save(victim, array)
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(work), tmp_path / 'again'))
    assert result.returncode == 1 and re.search(r'\n  1 clips \(e\.g\. ' + re.escape(clip) + r'\): changed since',
                                                result.stderr), result.stderr
    record('provenance', 'a copied feature file edited in place (same size)', 'save_hdf5.py',
           f'exit 1: "{[l for l in result.stderr.splitlines() if "changed since" in l][0].strip()[:110]}..."')


def test_copy_of_records_without_digests(tiny_ucf, extracted, tmp_path):
    """Records written before content digests cannot check a copy: the refusal says it was copied without times
    and how to copy (it said 'no record of the extraction')."""
    work = tmp_path / 'work'
    copy_without_times(extracted, work)
    for tsv in (work / 'UCF-101_features' / '.extractions').glob('*.tsv'):
        lines = [l.split('\t') for l in tsv.read_text().splitlines()]
        tsv.write_text(''.join('\t'.join([p[0], p[1], p[2], p[4], p[5]]) + '\n' for p in lines))  # the old format
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(work), tmp_path / 'packed'))
    assert result.returncode == 1 and re.search(r'cannot be traced to an extraction:\n  \d+ clips \(\d+ files\) '
                                                r'.*copied without keeping times.*cp -p', result.stderr), result.stderr
    record('provenance', '`cp -r` of features whose records predate content digests', 'save_hdf5.py',
           'exit 1: "... their modification times differ from the recorded ones while their sizes match (copied '
           'without keeping times?) ... copy them again with `cp -p`/`rsync -a` ..., or re-extract them"')


def test_features_of_two_models_never_mix(tiny_ucf, tiny_model, small_vgg, extracted, tmp_path):
    """The handout's second experiment: a new VGG_1024.model, then Parts 2-3 again in the same folders."""
    work = tmp_path / 'work'
    shutil.copytree(extracted, work)
    new = other_model(tiny_ucf, small_vgg, tmp_path / 'VGG_1024_augmented.model', seed=7)
    args = extraction_args(tiny_ucf, new, str(work), '--num-shards', '2')
    result = run('saveFeatures_1024.py', *args, '--shard', '0')  # half of the clips re-extracted, as if killed
    assert result.returncode == 0, result.stderr
    assert re.search(r'warning: \d+ clips of this shard hold files of another extraction', result.stderr)
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(work), tmp_path / 'packed'))
    line = result.stderr.strip().splitlines()
    assert result.returncode == 1 and 'do not all come from one extraction' in result.stderr, result.stderr
    assert sum(bool(re.search(r'clips( \(\d+ files\))? \(e\.g\.', l)) for l in line) == 2
    assert not list((tmp_path).glob('packed/*.hdf5'))
    counted = [int(n) for n in re.findall(r'^  (\d+) clips', result.stderr, re.M)]
    lists = os.path.join(tiny_ucf[0], 'ucfTrainTestlist')
    assert sum(counted) == len(read_split(lists, 1, 'train')) + len(read_split(lists, 1, 'test'))  # clips, not files
    record('provenance', 'a second VGG_1024.model, extraction rerun on half the shards', 'save_hdf5.py',
           f'exit 1: "{line[0][:90]}..." then one line per extraction, counting clips (and files); nothing written')
    result = run('saveFeatures_1024.py', *args, '--shard', '1')
    assert result.returncode == 0, result.stderr
    result = run('save_hdf5.py', *pack_args(tiny_ucf, str(work), tmp_path / 'packed'))
    assert result.returncode == 0, result.stderr
    import VGGNet_1024
    model = VGGNet_1024.load_model(new)
    with h5py.File(tmp_path / 'packed' / 'test1024.hdf5', 'r') as f:
        name = f['_index/clips'][0].decode()
        _, feature = model.predict(np.stack([preprocess(tiny_ucf, name)]))
        assert np.allclose(f[name][0], feature[0], atol=1e-5)  # the new model's features, not the old ones
        packed_record = json.loads(f.attrs['provenance'])
    assert packed_record['extraction']['model']['digest'] == model.provenance['digest']
    record('provenance', 'the same extraction finished on every shard', 'save_hdf5.py',
           f'packed; the files record extraction {packed_record["extraction"]["tag"]} (model digest '
           f'{model.provenance["digest"]}) and hold the new model\'s features')


def preprocess(tiny_ucf, name):
    """The first frame of clip `name` (a packed dataset's name), as the network sees it."""
    from ucf.preprocessing import preprocess_frame
    from ucf.video import iter_frames
    root, _ = tiny_ucf
    clip = next(c for s in ('train', 'test') for c in read_split(os.path.join(root, 'ucfTrainTestlist'), 1, s)
                if clip_stem(c.path) == name)
    return preprocess_frame(next(iter_frames(os.path.join(root, 'UCF-101', clip.path))), 32)


def test_model_of_another_split_is_refused(tiny_ucf, small_vgg, tmp_path):
    model = other_model(tiny_ucf, small_vgg, tmp_path / 'VGG_1024.model', seed=3, split=1)
    args = extraction_args(tiny_ucf, model, str(tmp_path), '--num-shards', '4', '--shard', '0', '--split', '2')
    result = run('saveFeatures_1024.py', *args)
    line = error_line(result)
    assert result.returncode == 1 and 'fine-tuned on split 1' in line and '--allow-other-split' in line, line
    assert not (tmp_path / 'UCF-101_features').exists()
    record('split leak', 'extract split 2 with a model fine-tuned on split 1', 'saveFeatures_1024.py',
           f'exit 1: {line}')
    result = run('saveFeatures_1024.py', *args, '--allow-other-split')
    assert result.returncode == 0, result.stderr


def results_file(path, tag, model=None):
    from ucf.provenance import make_provenance, provenance_text
    from ucf.results import Results
    extraction = make_provenance('saveFeatures_1024.py', tag=tag, split=1, model={'digest': tag, 'split': 1})
    Results(['A/v_A_g01_c01', 'B/v_B_g01_c01', 'C/v_C_g01_c01'], [0, 1, 2], np.eye(3), ['A', 'B', 'C'], split=1,
            **({'model': model} if model else {}),
            provenance=provenance_text(make_provenance('x', input=make_provenance('save_hdf5.py',
                                                                                  extraction=extraction)))
            ).save(str(path))
    return str(path)


def test_comparison_of_different_extractions_is_refused(tmp_path):
    result = run('confusion.py', '--single', results_file(tmp_path / 's.npz', 'aaaa'),
                 '--lstm', results_file(tmp_path / 'l.npz', 'bbbb'), '--out', str(tmp_path / 'report'))
    line = error_line(result)
    assert result.returncode == 1 and 'extraction aaaa' in line and 'extraction bbbb' in line, result.stderr
    record('provenance', 'single-frame and LSTM results from different extractions', 'confusion.py',
           f'exit 1: {line[:160]}...')
    result = run('confusion.py', '--single', results_file(tmp_path / 's.npz', 'aaaa'),
                 '--lstm', results_file(tmp_path / 'l.npz', 'aaaa'), '--out', str(tmp_path / 'report'))
    assert result.returncode == 0, result.stderr
    chain = json.loads((tmp_path / 'report' / 'provenance.json').read_text())
    assert chain['lstm']['input']['extraction']['tag'] == 'aaaa'


def test_swapped_or_broken_results_are_refused(tmp_path):
    single, lstm = results_file(tmp_path / 's.npz', 'aaaa', 'single frame'), results_file(tmp_path / 'l.npz', 'aaaa',
                                                                                          'lstm')
    result = run('confusion.py', '--single', lstm, '--lstm', single, '--out', str(tmp_path / 'report'))
    line = error_line(result)
    assert result.returncode == 1 and 'holds the results of the lstm model' in line and 'swapped' in line
    assert not (tmp_path / 'report').exists()
    record('bad input', 'confusion.py with --single and --lstm swapped', 'confusion.py', f'exit 1: {line[:170]}...')
    whole = open(lstm, 'rb').read()
    for name, content in (('cut.npz', whole[:len(whole) // 2]), ('text.npz', b'accuracy 0.67\n')):
        (tmp_path / name).write_bytes(content)
        result = run('confusion.py', '--single', single, '--lstm', str(tmp_path / name), '--out', str(tmp_path / 'r'))
        line = error_line(result)
        assert result.returncode == 1 and 'not a readable results file' in line and 'Traceback' not in result.stderr
        record('bad input', f'a {"truncated" if name == "cut.npz" else "text"} results file', 'confusion.py',
               f'exit 1: {line[:150]}...')
    result = run('confusion.py', '--single', single, '--lstm', lstm, '--out', str(tmp_path / 'report'))
    assert result.returncode == 0, result.stderr


def test_normalising_features_of_two_extractions_is_refused(tmp_path):
    for seed in (0, 1):
        synthetic_ucf101.write_fake_features(str(tmp_path / f'x{seed}'), n_classes=3, groups=21,
                                             clips_per_group=(1, 1), dim=4, frames=(3, 6), mean_frames=4, seed=seed)
        work = tmp_path / f'x{seed}'
        assert run('save_hdf5.py', '--lists', str(work / 'ucfTrainTestlist'), '--features-dir',
                   str(work / 'UCF-101_features'), '--predictions-dir', str(work / 'UCF-101_framePrediction'),
                   '--out-dir', str(work)).returncode == 0
    result = run('normalizeData.py', '--train', str(tmp_path / 'x0' / 'train1024.hdf5'),
                 '--test', str(tmp_path / 'x1' / 'test1024.hdf5'), '--train-out', str(tmp_path / 'a.hdf5'),
                 '--test-out', str(tmp_path / 'b.hdf5'), '--stats', str(tmp_path / 's.npz'))
    line = error_line(result)
    assert result.returncode == 1 and 'extraction generated0' in line and 'extraction generated1' in line, line
    record('provenance', 'train and test features of two extractions', 'normalizeData.py', f'exit 1: {line[:150]}...')


def test_divergence_stops_fine_tuning(tiny_ucf, small_vgg, tmp_path):
    root, _ = tiny_ucf
    (tmp_path / 'VGG_1024.model').write_bytes(b'previous result')
    result = run('frameBasedTrain.py', '--data', os.path.join(root, 'UCF-101'), '--lists',
                 os.path.join(root, 'ucfTrainTestlist'), '--vgg', small_vgg, '--out', str(tmp_path), '--model-out',
                 str(tmp_path / 'VGG_1024.model'), '--feature-size', '8', '--batchsize', '15', '--epoch', '3',
                 '--train-from', 'conv1_1', '--lr', '1e6', '--loaderjob', '0', '--snapshot-interval', '1')
    line = error_line(result)
    assert result.returncode == 1 and 'training diverged at iteration' in line and '--lr' in line, result.stderr
    assert 'Traceback' not in result.stderr
    assert (tmp_path / 'VGG_1024.model').read_bytes() == b'previous result'
    for snapshot in tmp_path.glob('snapshot_iter_*'):  # every snapshot left is of finite weights
        with np.load(snapshot) as f:
            assert all(np.isfinite(f[k]).all() for k in f.files if 'predictor' in k or k.startswith('updater/model'))
    record('divergence', 'fine-tuning from conv1_1 at --lr 1e6 goes NaN', 'frameBasedTrain.py',
           f'exit 1: {line[:170]}...; no model written, earlier snapshots finite')


@pytest.mark.parametrize('lr,what', [('1e38', 'the loss is'), ('1e30', 'times that of guessing among')])
def test_divergence_stops_lstm_training(lr, what, reference_packed, tmp_path):
    """At 1e38 the loss goes NaN; at 1e30 it stays finite, ~1e29 every epoch (it used to train on, exit 0)."""
    result = run('rnn.py', '--train', str(reference_packed / 'train1024_norm.hdf5'), '--test',
                 str(reference_packed / 'test1024_norm.hdf5'), '--out', str(tmp_path), '--model-out',
                 str(tmp_path / 'rnn.model'), '--results', str(tmp_path / 'r.npz'), '--hidden', '8', '--fc', '8',
                 '--seqlen', '12', '--bptt', '4', '--epoch', '3', '--optimizer', 'sgd', '--lr', lr)
    line = error_line(result)
    assert result.returncode == 1 and 'training diverged at iteration' in line and what in line, result.stderr
    assert 'no snapshot had been written yet' in line and '--grad-clip' in line
    assert not (tmp_path / 'rnn.model').exists() and not (tmp_path / 'r.npz').exists()
    record('divergence', f'LSTM training at --lr {lr} (SGD)', 'rnn.py', f'exit 1: {line[:200]}...; nothing written')


@pytest.mark.parametrize('script,args,flag', [
    ('frameBasedTrain.py', ['--batchsize', '-1'], '--batchsize'), ('frameBasedTrain.py', ['--batchsize', '0'],
                                                                   '--batchsize'),
    ('frameBasedTrain.py', ['--epoch', '-1'], '--epoch'), ('frameBasedTrain.py', ['--lr', 'nan'], '--lr'),
    ('rnn.py', ['--batchsize', '0'], '--batchsize'), ('rnn.py', ['--epoch', '-1'], '--epoch'),
    ('rnn.py', ['--dropout', '1.5'], '--dropout'), ('saveFeatures_1024.py', ['-b', '0'], '--batchsize'),
    ('saveFeatures_1024.py', ['--num-shards', '0'], '--num-shards'),
    ('generate_pbs.py', ['--dry-run', '--', '--split', '4'], '--split'),
    ('generate_pbs.py', ['--dry-run', '--num-shards', '0'], '--num-shards'),
    ('generate_pbs.py', ['--dry-run', '--', '-b', '0'], '--batchsize'),
    ('generate_pbs.py', ['--dry-run', '--walltime', 'two hours'], '--walltime'),
    ('VGGNet.py', ['--random', '--insize', '0'], '--insize'),
    ('VGGNet.py', ['--random', '--insize', '-32'], '--insize'),
    ('VGGNet.py', ['--random', '--insize', '33'], '--insize'),
    ('VGGNet.py', ['--random', '--fc-size', '0'], '--fc-size'),
    ('VGGNet.py', ['--random', '--widths', '0', '0', '0', '0', '0'], '--widths'),
    ('VGGNet.py', ['--bogus-flag', '3'], '--bogus-flag'),
    ('synthetic_ucf101.py', ['--classes', '0'], '--classes'),
    ('synthetic_ucf101.py', ['--frames', '0', '0'], '--frames'),
    ('synthetic_ucf101.py', ['--frames', '9', '3'], '--frames'),
    ('confusion.py', ['--top', '0'], '--top'),
    ('confusion.py', ['--top', '-1'], '--top'),
])
def test_bad_numbers_are_refused_at_parse_time(script, args, flag, tmp_path):
    result = run(script, *args, cwd=str(tmp_path))
    assert result.returncode == 2 and flag in result.stderr and 'Traceback' not in result.stderr, result.stderr
    assert not os.listdir(tmp_path)  # nothing written
    record('bad numbers', f'{script} {" ".join(args)}', script,
           f'exit 2: {result.stderr.strip().splitlines()[-1]}')


def unreadable_class(tiny_ucf, tmp_path, name='Archery'):
    root, _ = tiny_ucf
    shutil.copytree(root, tmp_path / 'set')
    for clip in (tmp_path / 'set' / 'UCF-101' / name).iterdir():
        clip.write_bytes(b'')
    return tmp_path / 'set'


def test_class_with_no_readable_clip(tiny_ucf, small_vgg, tmp_path):
    data = unreadable_class(tiny_ucf, tmp_path)
    result = run('frameBasedTrain.py', '--data', str(data / 'UCF-101'), '--lists', str(data / 'ucfTrainTestlist'),
                 '--vgg', small_vgg, '--out', str(tmp_path / 'out'), '--model-out', str(tmp_path / 'm.model'),
                 '--loaderjob', '2', '--epoch', '1', '--batchsize', '8', timeout=120)
    line = error_line(result)
    assert result.returncode == 1 and "no clip of class 'Archery' can be read" in line, result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'm.model').exists()
    record('bad clip', 'every training clip of one class unreadable', 'frameBasedTrain.py',
           f'exit 1 before training (each clip checked once, up front): {line}')


def test_loader_failure_mid_run_ends_the_run(tiny_ucf, small_vgg, tmp_path):
    """Clips that vanish after the check (a scratch purge): the loader process that meets them stops the run
    with exit 1, instead of Chainer's multiprocess iterator waiting for the example forever."""
    import frameBasedTrain
    from ucf.errors import DataError
    root, _ = tiny_ucf
    shutil.copytree(root, tmp_path / 'set')
    args = frameBasedTrain.parse_args([
        '--data', str(tmp_path / 'set' / 'UCF-101'), '--lists', str(tmp_path / 'set' / 'ucfTrainTestlist'),
        '--vgg', small_vgg, '--out', str(tmp_path / 'out'), '--model-out', str(tmp_path / 'm.model'),
        '--loaderjob', '1', '--epoch', '2', '--batchsize', '8'])
    trainer, _, _, _ = frameBasedTrain.make_trainer(args)
    for clip in (tmp_path / 'set' / 'UCF-101' / 'Archery').iterdir():
        clip.unlink()
    start = time.time()
    try:
        with pytest.raises(DataError, match='a frame-loading process stopped'):
            trainer.run(show_loop_exception_msg=False)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    record('bad clip', "a class's clips deleted while fine-tuning runs (loader processes)", 'frameBasedTrain.py',
           f'the loader prints the class and signals the trainer: run ends with exit 1 after '
           f'{time.time() - start:.0f} s, no hang, no model written')
