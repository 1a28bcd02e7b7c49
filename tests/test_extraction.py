"""Part 2: sharded extraction, its resumability, packing, normalisation and single-frame accuracy."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import VGGNet_1024
import normalizeData
import saveFeatures_1024
import save_hdf5
import singleFrameAccuracy
from conftest import ROOT, extraction_args
from helperFunctions import read_split
from ucf.extraction import clip_stem
from ucf import packed_hdf5
from ucf.preprocessing import preprocess_frame
from ucf.video import read_frames


def npy_files(folder):
    """The .npy files under their final names (not hidden temporary files, not the .extractions/ manifest)."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
                  if f.endswith('.npy') and not f.startswith('.') and '/.' not in d.replace(os.sep, '/'))


def test_shard_ranges_cover_everything_and_balance_frames():
    rng = np.random.RandomState(0)
    weights = rng.randint(29, 1800, size=13320)
    ranges = saveFeatures_1024.shard_ranges(weights, 12)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(weights)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    totals = [weights[s:e].sum() for s, e in ranges]
    assert max(totals) - min(totals) <= 2 * weights.max()
    few = saveFeatures_1024.shard_ranges([5, 5], 4)  # more shards than clips: some are empty
    assert sum(e - s for s, e in few) == 2 and few[0][0] == 0 and few[-1][1] == 2


def test_extraction_outputs_match_the_model(tiny_ucf, tiny_model, extracted):
    root, written = tiny_ucf
    features, predictions = (os.path.join(extracted, d) for d in ('UCF-101_features', 'UCF-101_framePrediction'))
    expected = sorted(clip_stem(p) + '.npy' for p in written)
    assert npy_files(features) == expected and npy_files(predictions) == expected
    model = VGGNet_1024.load_model(tiny_model, conv='fast')  # extraction's default; fast vs stock: test_fast_conv
    for rel in sorted(written)[::17]:
        frames = read_frames(os.path.join(root, 'UCF-101', rel))
        feature = np.load(os.path.join(features, clip_stem(rel) + '.npy'))
        prob = np.load(os.path.join(predictions, clip_stem(rel) + '.npy'))
        assert feature.shape == (written[rel], 16) and prob.shape == (written[rel], 4)
        assert feature.dtype == prob.dtype == np.float32
        # Same preprocessing function as training: recompute the network's outputs here.
        want_prob, want_feature = model.predict(np.stack([preprocess_frame(f, 32) for f in frames]))
        # float32 rounding only (batching and the convolution's summation order differ); a preprocessing
        # difference would be orders of magnitude larger
        assert np.allclose(feature, want_feature, rtol=1e-4, atol=1e-5)
        assert np.allclose(prob, want_prob, rtol=1e-4, atol=1e-6)
    summaries = os.listdir(os.path.join(extracted, 'extraction_logs'))
    assert sorted(s for s in summaries if s.startswith('summary')) == [
        f'summary_shard_{k:02d}_of_03.json' for k in range(3)]


def test_rerun_skips_finished_clips(tiny_ucf, tiny_model, extracted, capsys):
    summary = saveFeatures_1024.main(extraction_args(tiny_ucf, tiny_model, extracted, '--shard', '1',
                                                     '--num-shards', '3'))
    assert summary['done_before'] == summary['clips_in_shard'] > 0
    assert summary['complete'] == summary['skipped'] == 0


def test_killed_shard_resumes_with_every_file_whole(tiny_ucf, tiny_model, extracted, tmp_path):
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    features = tmp_path / 'UCF-101_features'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'saveFeatures_1024.py'), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(npy_files(features) if features.exists() else []) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_when_killed = [f for f in npy_files(features) if not os.path.basename(f).startswith('.')]
    assert 20 <= len(done_when_killed) < 100, 'the kill should land mid-run'
    for name in done_when_killed:  # every file that has its final name is whole
        np.load(features / name)
    summary = saveFeatures_1024.main(args)
    assert summary['done_before'] >= len(done_when_killed) - 1 and summary['skipped'] == 0
    for folder in ('UCF-101_features', 'UCF-101_framePrediction'):
        names = [f for f in npy_files(tmp_path / folder) if not os.path.basename(f).startswith('.')]
        assert names == npy_files(os.path.join(extracted, folder))
        for name in names:  # identical to the uninterrupted run
            assert np.array_equal(np.load(tmp_path / folder / name), np.load(os.path.join(extracted, folder, name)))


def test_bad_clip_is_recorded_and_the_shard_goes_on(tiny_ucf, tiny_model, tmp_path):
    root, written = tiny_ucf
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(root, 'UCF-101'), data)
    victims = sorted(written)[:2]
    (data / victims[0]).write_bytes(os.urandom(5000))       # not a video at all
    full = (data / victims[1]).read_bytes()
    (data / victims[1]).write_bytes(full[:len(full) * 2 // 3])  # truncated download
    args = extraction_args(tiny_ucf, tiny_model, str(tmp_path), '--shard', '0', '--num-shards', '1')
    args[1] = str(data)
    summary = saveFeatures_1024.main(args)
    assert summary['skipped'] >= 1 and summary['complete'] + summary['partial'] + summary['skipped'] == len(written)
    with open(summary['failures_file'], newline='') as f:
        rows = {r['clip']: r for r in csv.DictReader(f, delimiter='\t')}
    assert rows[victims[0]]['status'] == 'skipped'
    assert int(rows[victims[1]]['frames_read']) < int(rows[victims[1]]['frames_claimed'])
    assert not (tmp_path / 'UCF-101_features' / (clip_stem(victims[0]) + '.npy')).exists()


def pack_args(tiny_ucf, work, out, *extra):
    root, _ = tiny_ucf
    return ['--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--features-dir', os.path.join(work, 'UCF-101_features'),
            '--predictions-dir', os.path.join(work, 'UCF-101_framePrediction'),
            '--log-dir', os.path.join(work, 'extraction_logs'), '--out-dir', str(out), *extra]


@pytest.fixture(scope='module')
def packed(tiny_ucf, extracted, tmp_path_factory):
    out = tmp_path_factory.mktemp('packed')
    save_hdf5.main(pack_args(tiny_ucf, extracted, out))
    return out


def test_packed_files(tiny_ucf, extracted, packed):
    root, written = tiny_ucf
    lists = os.path.join(root, 'ucfTrainTestlist')
    for name, subset, dims in (('train1024.hdf5', 'train', 16), ('test1024.hdf5', 'test', 16),
                               ('testPredictions1024.hdf5', 'test', 4)):
        header = packed_hdf5.read_hdf5_header(str(packed / name), expect_split=1, expect_subset=subset)
        clips = read_split(lists, 1, subset)
        assert header['clips'] == [clip_stem(c.path) for c in clips]
        assert list(header['labels']) == [c.label for c in clips]
        assert 'HandstandPushups' in header['classes'] and header['dim'] == dims
        with h5py.File(packed / name, 'r') as f:
            folder = 'UCF-101_framePrediction' if dims == 4 else 'UCF-101_features'
            for c in clips[::10]:
                assert np.array_equal(f[clip_stem(c.path)][()],
                                      np.load(os.path.join(extracted, folder, clip_stem(c.path) + '.npy')))
                assert f[clip_stem(c.path)].attrs['label'] == c.label


def test_packing_refuses_missing_clips(tiny_ucf, extracted, tmp_path, capsys):
    work = tmp_path / 'work'
    shutil.copytree(extracted, work)
    victim = sorted(npy_files(work / 'UCF-101_features'))[0]
    os.unlink(work / 'UCF-101_features' / victim)
    with pytest.raises(SystemExit, match=r'(?s)1 of the \d+ clips of (train|test)list01\.txt have no features file.*'
                       + victim[:-4] + '.*1 have no file yet: rerun the missing shards'):
        save_hdf5.main(pack_args(tiny_ucf, str(work), tmp_path))
    assert not list(tmp_path.glob('*.hdf5'))  # nothing written
    save_hdf5.main(pack_args(tiny_ucf, str(work), tmp_path, '--skip-missing'))
    assert 'packing without them' in capsys.readouterr().err


def test_feature_statistics_keep_small_variances_and_skip_nonfinite_clips(tmp_path, capsys):
    """Statistics streamed clip by clip against numpy on all frames at once in float64, on features with a large
    mean and a small spread (where summing squares without centring cancels), a dead unit, clips of different
    lengths; a clip holding NaN and one holding inf are left out, and said so."""
    rng = np.random.RandomState(0)
    items = []
    for k in range(7):
        x = (50 + 1e-3 * rng.normal(size=(rng.randint(1, 40), 8))).astype(np.float32)
        x[:, 0] = 0  # a unit that never fires
        x[:, 1] = rng.uniform(0, 30, len(x))  # and one that varies a lot
        if k == 2:
            x[-1, 3] = np.nan
        if k == 5:
            x[0, 4] = np.inf
        items.append((f'C/v_C_g{k + 1:02d}_c01', 0, x))
    path = str(tmp_path / 'features.hdf5')
    packed_hdf5.write_packed(path, items, len(items), ['C'], split=1, subset='train', kind='features')
    mean, std, count, left_out = normalizeData.feature_statistics(packed_hdf5.PackedFile(path))
    kept = [x for k, (_, _, x) in enumerate(items) if k not in (2, 5)]
    want = np.concatenate(kept).astype(np.float64)
    assert left_out == {name for k, (name, _, _) in enumerate(items) if k in (2, 5)} and count == len(want)
    assert np.allclose(mean, want.mean(axis=0), rtol=1e-7, atol=1e-12)  # float32 rounding of the shift
    assert np.allclose(std, want.std(axis=0), rtol=1e-6, atol=1e-12) and std[0] == 0
    assert capsys.readouterr().err.count('holds NaN or inf') == 2


def test_normalization(packed, tmp_path):
    out = dict(train=str(tmp_path / 'train_norm.hdf5'), test=str(tmp_path / 'test_norm.hdf5'))
    normalizeData.main(['--train', str(packed / 'train1024.hdf5'), '--test', str(packed / 'test1024.hdf5'),
                        '--train-out', out['train'], '--test-out', out['test'],
                        '--stats', str(tmp_path / 'stats.npz')])
    with h5py.File(packed / 'train1024.hdf5', 'r') as f:
        raw = np.concatenate([f[n][()] for n in packed_hdf5.read_hdf5_header(str(packed / 'train1024.hdf5'))['clips']])
    with h5py.File(out['train'], 'r') as f:
        normalized = np.concatenate([f[n][()] for n in packed_hdf5.read_hdf5_header(out['train'])['clips']])
    stats = np.load(tmp_path / 'stats.npz')
    assert np.allclose(stats['mean'], raw.mean(axis=0), atol=1e-4)
    varying = raw.std(axis=0) > 1e-6
    assert np.allclose(stats['std'][varying], raw.std(axis=0)[varying], rtol=1e-3)
    assert np.allclose(normalized.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(normalized.std(axis=0)[varying], 1, atol=1e-3)
    assert np.isfinite(normalized).all() and (stats['std'] > 0).all()
    with h5py.File(out['test'], 'r') as f, h5py.File(packed / 'test1024.hdf5', 'r') as g:
        name = packed_hdf5.read_hdf5_header(out['test'])['clips'][0]
        assert np.allclose(f[name][()], (g[name][()] - stats['mean']) / stats['std'], atol=1e-5)


def test_single_frame_accuracy(packed, tmp_path, capsys):
    accuracies = singleFrameAccuracy.main(['--predictions', str(packed / 'testPredictions1024.hdf5'),
                                           '--results', str(tmp_path / 'r.npz'), '--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'Accuracy(top 1, top 5, top 10): (' in out and 'test clips scored' in out
    assert accuracies[2] == 1.0  # 4 classes: top-10 is certain
    results = np.load(tmp_path / 'r.npz')
    with h5py.File(packed / 'testPredictions1024.hdf5', 'r') as f:
        name = str(results['clips'][0])
        assert np.allclose(results['scores'][0], np.log(f[name][()]).sum(axis=0), rtol=1e-4)
    for produced in ('singleFrame_confusion.png', 'singleFrame_confusion.csv', 'singleFrame_per_class.csv'):
        assert (tmp_path / produced).stat().st_size > 0
    with pytest.raises(SystemExit, match='not per-frame predictions'):
        singleFrameAccuracy.main(['--predictions', str(packed / 'test1024.hdf5'), '--results',
                                  str(tmp_path / 'x.npz')])


def test_most_confused_lists_only_real_confusions():
    from ucf.report import most_confused
    counts = np.array([[5, 0, 1], [0, 4, 0], [2, 0, 3]])
    pairs = most_confused(counts, ['A', 'B', 'C'], n=10)
    assert [(t, p, c) for t, p, _, c in pairs] == [('C', 'A', 2), ('A', 'C', 1)]
    assert most_confused(np.diag([3, 4]), ['A', 'B']) == []


def test_topk_with_two_classes():
    from ucf.results import topk_accuracies
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert topk_accuracies(np.array([0, 1, 1]), scores) == (2 / 3, 1.0, 1.0)


def test_store_keeps_any_number_of_outputs_and_reads_older_manifests(tmp_path):
    """The extraction store knows its outputs by name: three outputs are written, recorded and traced like two;
    a manifest whose record names no outputs (written before records did) is read as features, predictions."""
    import json

    from ucf.extraction import ExtractionStore
    from ucf.provenance import make_provenance
    clip = 'A/v_A_g01_c01.avi'
    folders = {name: str(tmp_path / name) for name in ('features', 'predictions', 'motion')}
    store = ExtractionStore(folders)
    store.start(make_provenance('saveFeatures_1024.py', tag='three', split=1))
    arrays = {name: np.full((5, k + 2), k, np.float64) for k, name in enumerate(folders)}
    store.save(clip, arrays)
    again = ExtractionStore(folders)  # read back from the files alone
    assert again.tag_of(clip) == 'three' and again.tag_of(clip, ('motion',)) == 'three'
    for name, array in arrays.items():
        assert again.read(clip, name).dtype == np.float32 and np.array_equal(again.read(clip, name), array)
    assert json.loads((tmp_path / 'features' / '.extractions' / 'three.json').read_text())['outputs'] == list(folders)
    np.save(again.path(clip, 'motion'), np.zeros((6, 4), np.float32))  # another run's file for one output
    again = ExtractionStore(folders)
    assert again.tag_of(clip, ('features', 'predictions')) == 'three' and again.tag_of(clip) is None
    assert 'changed since' in again.why_not(clip)

    two = {name: str(tmp_path / 'old' / name) for name in ('features', 'predictions')}
    old = ExtractionStore(two)
    old.start(make_provenance('saveFeatures_1024.py', tag='old', split=1))
    old.save(clip, {name: arrays[name] for name in two})
    record_path = tmp_path / 'old' / 'features' / '.extractions' / 'old.json'
    record_path.write_text(json.dumps({k: v for k, v in json.loads(record_path.read_text()).items() if k != 'outputs'}))
    assert ExtractionStore(two).tag_of(clip) == 'old'


def test_results_file_round_trip(tmp_path):
    from ucf.results import Results
    results = Results(['A/v_A_g01_c01', 'B/v_B_g01_c01'], [0, 1], [[0.2, 0.1], [0.3, 0.9]], ['A', 'B'], split=2,
                      model='lstm', inference='full', provenance='{"step": "rnn.py"}')
    results.save(str(tmp_path / 'r.npz'))
    loaded = Results.load(str(tmp_path / 'r.npz'), 'lstm')
    assert list(loaded.clips) == list(results.clips) and loaded.classes == ['A', 'B'] and loaded.split == 2
    assert loaded.info['inference'] == 'full' and loaded.provenance == {'step': 'rnn.py'}
    assert loaded.topk((1,)) == (1.0,) and loaded.confusion().tolist() == [[1, 0], [0, 1]]
    assert list(loaded.restrict({'B/v_B_g01_c01'}).labels) == [1]
