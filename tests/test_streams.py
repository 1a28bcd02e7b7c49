"""The flow stream through the real steps on the tiny set (extraction, packing, normalising, single frames), and
its fusion with the RGB stream (two-stream single frames, the LSTM on both streams' features)."""
import contextlib
import os

import numpy as np
import pytest

import VGGNet
import VGGNet_1024
import normalizeData
import rnn
import saveFeatures_1024
import save_hdf5
import singleFrameAccuracy
from conftest import FLOW, extraction_args
from ucf import flow, video
from ucf.extraction import clip_stem
from ucf.packed_hdf5 import PackedFile
from ucf.results import Results

def folders(work, stream):
    """Each stream's own folders, as flags."""
    return ['--features-dir', os.path.join(work, f'UCF-101_features_{stream}'), '--predictions-dir',
            os.path.join(work, f'UCF-101_framePrediction_{stream}'), '--log-dir', os.path.join(work, f'logs_{stream}')]


@pytest.fixture(scope='module')
def streams(tiny_ucf, tiny_model, flow_model, tmp_path_factory):
    """Both streams extracted, packed and normalised into one folder under the default names."""
    work = str(tmp_path_factory.mktemp('streams'))
    root, _ = tiny_ucf
    for stream, model in (('rgb', tiny_model), ('flow', flow_model)):
        saveFeatures_1024.main(extraction_args(tiny_ucf, model, work, '--stream', stream, '--num-shards', '1',
                                               *folders(work, stream)))
        save_hdf5.main(['--stream', stream, '--lists', os.path.join(root, 'ucfTrainTestlist'), '--out-dir', work,
                        *folders(work, stream)])
        with contextlib.chdir(work):
            normalizeData.main(['--stream', stream])
    return work


def test_flow_features_pair_with_rgb_frame_by_frame(tiny_ucf, flow_model, streams):
    root, written = tiny_ucf
    model = VGGNet_1024.load_model(flow_model, conv='fast', stream='flow')
    for rel in sorted(written)[::19]:
        rgb = np.load(os.path.join(streams, 'UCF-101_features_rgb', clip_stem(rel) + '.npy'))
        motion = np.load(os.path.join(streams, 'UCF-101_features_flow', clip_stem(rel) + '.npy'))
        assert motion.shape == (rgb.shape[0], 16) == (written[rel], 16)
        stacks = np.stack([flow.stacked(planes) for _, planes in
                           flow.clip_stacks(video.iter_frames(os.path.join(root, 'UCF-101', rel)), FLOW, 32)])
        _, want = model.predict(stacks)  # the network's fc7 on the stacks made from the decoded frames
        assert np.allclose(motion, want, rtol=1e-4, atol=1e-5)
    packed = PackedFile(os.path.join(streams, 'test1024_norm_flow.hdf5'), stream='flow')
    assert packed.kind == 'normalized features' and packed.record['input']['extraction']['flow'] == FLOW._asdict()


def test_two_stream_single_frames_average_each_frames_probabilities(streams, capsys, monkeypatch):
    monkeypatch.chdir(streams)
    singleFrameAccuracy.main(['--stream', 'flow'])
    fused = singleFrameAccuracy.main(['--stream', 'two-stream', '--flow-weight', '0.25'])
    out = capsys.readouterr().out
    assert 'rgb single frame: Accuracy' in out and 'flow single frame: Accuracy' in out and fused[2] == 1.0
    results = Results.load('singleFrame_results_twostream.npz')
    rgb, motion = (PackedFile(f'testPredictions1024{s}.hdf5') for s in ('', '_flow'))
    for i in (0, 7, len(rgb) - 1):
        p = 0.75 * rgb.read(i).astype(np.float64) + 0.25 * motion.read(i).astype(np.float64)
        assert np.allclose(results.scores[i], np.log(p).sum(axis=0), rtol=1e-5)
    assert results.stream == 'two-stream' and results.label == 'two-stream single frame'
    assert results.info['flow_weight'] == 0.25


def test_two_stream_lstm_reads_both_streams_side_by_side(streams, monkeypatch):
    monkeypatch.chdir(streams)
    final, _ = rnn.main(['--stream', 'two-stream', '--epoch', '2', '--seqlen', '12', '--bptt', '4', '--hidden', '8',
                         '--fc', '8', '--batchsize', '8'])
    assert os.path.isfile('rnn_twostream.model') and os.path.isdir('result_lstm_twostream')
    with np.load('rnn_twostream.model') as weights:
        assert weights['upward/0/W'].shape[1] == 32  # 16-d rgb + 16-d flow features of each frame
    train = rnn.JoinedFeatures(PackedFile('train1024_norm.hdf5'), PackedFile('train1024_norm_flow.hdf5'))
    assert np.array_equal(train.read(3), np.concatenate([PackedFile('train1024_norm.hdf5').read(3),
                                                         PackedFile('train1024_norm_flow.hdf5').read(3)], axis=1))
    assert Results.load('lstm_results_twostream.npz').label == 'two-stream LSTM'


def test_packing_one_streams_files_as_the_others_is_refused(tiny_ucf, streams):
    root, _ = tiny_ucf
    with pytest.raises(SystemExit, match="come from the flow stream's extraction, not the rgb stream's: pack them "
                                         "with --stream flow"):
        save_hdf5.main(['--lists', os.path.join(root, 'ucfTrainTestlist'), '--out-dir', os.path.join(streams, 'x'),
                        *folders(streams, 'flow')])


def test_fine_tuning_the_flow_stream(tiny_ucf, small_vgg, tmp_path):
    """Two epochs on flow stacks made in two loader processes: the model records its stream and flow settings,
    every layer learns (conv1_1 moves from its cross-modality start), and extraction reads it as a flow model."""
    import frameBasedTrain
    root, _ = tiny_ucf
    frameBasedTrain.main(['--stream', 'flow', '--data', os.path.join(root, 'UCF-101'), '--lists',
                          os.path.join(root, 'ucfTrainTestlist'), '--vgg', small_vgg, '--out', str(tmp_path / 'out'),
                          '--model-out', str(tmp_path / 'flow.model'), '--feature-size', '8', '--batchsize', '15',
                          '--epoch', '2', '--lr', '0.001', '--loaderjob', '2', '--flow-stack', '3',
                          '--flow-algorithm', 'dis-ultrafast'])
    model = VGGNet_1024.load_model(str(tmp_path / 'flow.model'), stream='flow')
    assert model.in_channels == 6 and model.flow == dict(algorithm='dis-ultrafast', stack=3, bound=20.0,
                                                         subtract_mean=True)
    vgg, _ = VGGNet.load_vgg(small_vgg)
    start = np.repeat(vgg.conv1_1.W.array.mean(axis=1, keepdims=True), 6, axis=1)
    assert not np.allclose(model.conv1_1.W.array, start) and model.provenance['options']['dropout'] == 0.7
