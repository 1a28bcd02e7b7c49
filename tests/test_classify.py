"""classifyVideo.py: a video through the trained models gives the pipeline's scores; its picture, the annotated
video, --stride and --json; models that do not belong, and bad videos, are one line each."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import classifyVideo
import normalizeData
import rnn
import saveFeatures_1024
import save_hdf5
import singleFrameAccuracy
import synthetic_ucf101
from conftest import ROOT, extraction_args
from ucf import video
from ucf.extraction import clip_stem
from ucf.results import Results


@pytest.fixture(scope='module')
def trained(tiny_ucf, tiny_model, tmp_path_factory):
    """The handout's steps on the tiny set, under their default names in one folder: VGG_1024.model, its
    extraction, the packed and normalised features, single-frame results and a (briefly) trained rnn.model."""
    root, _ = tiny_ucf
    work = str(tmp_path_factory.mktemp('trained'))
    shutil.copy(tiny_model, os.path.join(work, 'VGG_1024.model'))
    shutil.copytree(os.path.join(root, 'ucfTrainTestlist'), os.path.join(work, 'ucfTrainTestlist'))
    with contextlib.chdir(work):
        saveFeatures_1024.main(extraction_args(tiny_ucf, 'VGG_1024.model', work, '--num-shards', '1'))
        save_hdf5.main(['--log-dir', os.path.join(work, 'extraction_logs')])
        normalizeData.main([])
        singleFrameAccuracy.main([])
        rnn.main(['--epoch', '2', '--seqlen', '12', '--bptt', '4', '--hidden', '8', '--fc', '8', '--batchsize', '8'])
    return work


def classify(work, *args):
    with contextlib.chdir(work):
        return classifyVideo.main([*args, '--out', os.path.join(work, 'pictures')])


def test_a_video_gets_the_pipelines_scores(tiny_ucf, trained):
    """The same clip through saveFeatures_1024.py + singleFrameAccuracy.py and rnn.py's evaluation, and through
    classifyVideo.py: the same scores (<= 1e-5)."""
    root, written = tiny_ucf
    single, lstm = (Results.load(os.path.join(trained, f)) for f in ('singleFrame_results.npz', 'lstm_results.npz'))
    clips = [str(c) for c in single.clips[::9]]
    paths = [os.path.join(root, 'UCF-101', next(rel for rel in written if clip_stem(rel) == c)) for c in clips]
    videos = classify(trained, *paths)
    for clip, path, v in zip(clips, paths, videos):
        i, j = list(single.clips).index(clip), list(lstm.clips).index(clip)
        assert v['frames'] == v['classified'] == len(video.read_frames(path))
        assert np.allclose(v['scores']['single frame'], single.scores[i], rtol=1e-5, atol=1e-5), clip
        assert np.allclose(v['scores']['LSTM [full]'], lstm.scores[j], rtol=1e-5, atol=1e-5), clip
        best = single.classes[int(np.argmax(single.scores[i]))]
        assert v['results']['single frame'][0][0] == best and len(v['results']['single frame']) == 4  # 4 classes
        assert abs(sum(p for _, p in v['results']['LSTM [full]']) - 1) < 1e-5
        assert os.path.getsize(v['picture']) > 5000


def test_annotated_video_plays_as_the_input_did(tiny_ucf, trained, tmp_path):
    """H.264 in yuv420p (what a browser plays), the input's frame count and rate; --json for scripts."""
    root, written = tiny_ucf
    path = os.path.join(root, 'UCF-101', sorted(written)[5])
    out = str(tmp_path / 'labelled.mp4')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'classifyVideo.py'), path, '--annotate', out,
                             '--json', '--out', str(tmp_path)], cwd=trained, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-800:]
    report = json.loads(result.stdout)
    assert report['failed'] == [] and report['videos'][0]['annotated'] == out
    import av
    with av.open(out) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ('h264', 'yuv420p')
        assert stream.average_rate == video.frame_rate(path)
    assert len(video.read_frames(out)) == len(video.read_frames(path)) == report['videos'][0]['frames']


def test_stride_classifies_every_kth_frame(tiny_ucf, trained):
    root, written = tiny_ucf
    path = os.path.join(root, 'UCF-101', sorted(written)[2])
    v = classify(trained, path, '--stride', '3')[0]
    assert v['classified'] == -(-v['frames'] // 3) and v['stride'] == 3


def test_models_that_do_not_belong_are_refused(tiny_ucf, small_vgg, trained, tmp_path):
    """Another fine-tuned model than the LSTM's features came from, other statistics, a missing LSTM: one line
    naming the file."""
    import VGGNet
    import VGGNet_1024
    root, written = tiny_ucf
    path = os.path.join(root, 'UCF-101', sorted(written)[0])
    other = str(tmp_path / 'other.model')
    vgg, _ = VGGNet.load_vgg(small_vgg)
    VGGNet.save_model(VGGNet_1024.from_vgg(vgg, n_classes=4, feature_size=16, seed=7), other, {'source': 'test'})
    stats = np.load(os.path.join(trained, 'feature_stats1024.npz'))
    from ucf.packed_hdf5 import FeatureStats
    FeatureStats(stats['mean'] + 1, stats['std'], stats['frames'] + 1, stats['constant']).save(str(tmp_path / 's.npz'))
    cases = [(['--model', other], 'other.model does not belong: '),
             (['--stats', str(tmp_path / 's.npz')], 's.npz does not belong: '),
             (['--rnn', str(tmp_path / 'none.model')], 'none.model: LSTM weights not found')]
    for extra, expected in cases:
        result = subprocess.run([sys.executable, os.path.join(ROOT, 'classifyVideo.py'), path, *extra, '--out',
                                 str(tmp_path)], cwd=trained, capture_output=True, text=True)
        assert result.returncode == 1 and expected in result.stderr and 'Traceback' not in result.stderr, \
            result.stderr[-800:]


def test_bad_videos_are_one_line_each(trained, tmp_path):
    """An unreadable file, a video of one frame (single frame only: the LSTM says why not), and an annotation
    that cannot be written."""
    (tmp_path / 'noise.avi').write_bytes(os.urandom(4000))
    frames = synthetic_ucf101.render_clip('Archery', 0, 0, 2, 1, 64, 48, np.random.RandomState(0))
    synthetic_ucf101.write_avi(str(tmp_path / 'one.avi'), frames, 25.0, codec='mpeg4')
    run = [sys.executable, os.path.join(ROOT, 'classifyVideo.py')]
    result = subprocess.run(run + [str(tmp_path / 'noise.avi'), str(tmp_path / 'one.avi'), '--out', str(tmp_path)],
                            cwd=trained, capture_output=True, text=True)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-800:]
    assert 'noise.avi: not a readable video' in result.stderr and '1 of 2 videos could not be classified' in \
        result.stderr
    assert 'note: no LSTM result: one frame is no sequence' in result.stdout and 'single frame' in result.stdout
    result = subprocess.run(run + [str(tmp_path / 'one.avi'), '--annotate', '/proc/labelled.mp4', '--out',
                                   str(tmp_path)], cwd=trained, capture_output=True, text=True)
    assert result.returncode == 1 and 'error: --annotate /proc/labelled.mp4: cannot write' in result.stderr, \
        result.stderr[-600:]
