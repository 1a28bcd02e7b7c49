"""Part 1: a short fine-tuning run on the synthetic set, its frozen layers, snapshots and resume."""
import json
import os

import numpy as np
import pytest

import VGGNet
import VGGNet_1024
import frameBasedTrain
from helperFunctions import read_split


def train_args(tiny_ucf, small_vgg, out, *extra):
    root, _ = tiny_ucf
    return ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--vgg', small_vgg, '--out', str(out), '--model-out', str(out / 'VGG_1024.model'),
            '--feature-size', '16', '--batchsize', '15', '--lr', '0.01', '--log-interval', '5',
            '--loaderjob', '0', *extra]


def test_training_and_extraction_preprocess_alike(tiny_ucf):
    """The training dataset's unaugmented frame is exactly preprocess_frame() of the decoded frame."""
    from ucf.frame_dataset import RandomFrameDataset
    from ucf.preprocessing import preprocess_frame
    from ucf.video import read_frames
    root, _ = tiny_ucf
    clips = read_split(os.path.join(root, 'ucfTrainTestlist'), 1, 'test')[:2]
    data = RandomFrameDataset(os.path.join(root, 'UCF-101'), clips, 32, train=False)
    for i, clip in enumerate(clips):
        frames = read_frames(os.path.join(root, 'UCF-101', clip.path))
        x, label = data.get_example(i)
        assert label == clip.label
        assert np.array_equal(x, preprocess_frame(frames[(len(frames) - 2) // 2], 32))
    # --cache-mb keeps decoded clips in memory: the same examples, the least recently used clip leaves first
    clips = read_split(os.path.join(root, 'ucfTrainTestlist'), 1, 'test')[:6]
    plain = RandomFrameDataset(os.path.join(root, 'UCF-101'), clips, 32, train=False)
    cached = RandomFrameDataset(os.path.join(root, 'UCF-101'), clips, 32, train=False, cache_mb=1)
    for i in range(len(clips)):
        assert np.array_equal(cached.get_example(i)[0], plain.get_example(i)[0])
        assert cached.cache_used <= 1 << 20 or len(cached.cache) == 1
    assert 1 <= len(cached.cache) < len(clips) and list(cached.cache)[-1] == len(clips) - 1


def test_fine_tuning_learns_and_keeps_frozen_layers(tiny_ucf, small_vgg, tmp_path):
    frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '8', '--test-eval'))
    with open(tmp_path / 'log') as f:
        log = json.load(f)
    losses = [entry['main/loss'] for entry in log]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert 'validation/main/accuracy' in log[-1]
    for png in ('loss.png', 'accuracy.png'):
        assert (tmp_path / png).stat().st_size > 1000
    vgg, _ = VGGNet.load_vgg(small_vgg)
    tuned = VGGNet_1024.load_model(str(tmp_path / 'VGG_1024.model'))
    for name in VGGNet.CONV_LAYERS + ['fc6']:
        assert np.array_equal(getattr(tuned, name).W.array, getattr(vgg, name).W.array), name
    assert tuned.fc8.W.shape == (4, 16)


def test_resume_after_interruption(tiny_ucf, small_vgg, tmp_path):
    # 75 training clips at batch 15: 5 iterations an epoch. The first run stops after epoch 2 (as a killed job
    # would have left it), the second is asked for 3 epochs and must start from the snapshot at iteration 10.
    frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '2'))
    snapshots = sorted(p for p in os.listdir(tmp_path) if p.startswith('snapshot'))
    assert snapshots == ['snapshot_iter_10', 'snapshot_iter_5']
    first = VGGNet_1024.load_model(str(tmp_path / 'VGG_1024.model'))
    trainer, model, _, _ = frameBasedTrain.make_trainer(
        frameBasedTrain.parse_args(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '3', '--resume', 'auto')))
    assert trainer.updater.iteration == 10 and trainer.updater.epoch == 2
    assert np.array_equal(model.fc7.W.array, first.fc7.W.array)
    trainer.run()
    assert trainer.updater.iteration == 15
    assert not np.array_equal(model.fc7.W.array, first.fc7.W.array)
    # The interrupted and resumed run is the run that was interrupted: the same weights as 3 epochs in one go
    # (frame order, frames drawn, augmentations and dropout all continue from the snapshot's random state).
    whole = tmp_path / 'whole'
    frameBasedTrain.main(train_args(tiny_ucf, small_vgg, whole, '--epoch', '3'))
    assert np.array_equal(model.fc7.W.array, VGGNet_1024.load_model(str(whole / 'VGG_1024.model')).fc7.W.array)


def test_resume_with_other_settings_is_refused(tiny_ucf, small_vgg, tmp_path):
    frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '1'))
    with pytest.raises(SystemExit, match=r"error: the snapshot is of a run with other settings: --lr 0.01 there, "
                                         r"0.02 now.*another --out"):
        frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '2', '--resume', 'auto',
                                        '--lr', '0.02'))


def test_resume_from_missing_snapshot_fails_clearly(tiny_ucf, small_vgg, tmp_path):
    with pytest.raises(SystemExit, match='error: .*nope: snapshot not found'):
        frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--resume', str(tmp_path / 'nope')))


def test_vgg_model_of_other_size_is_refused(tiny_ucf, small_vgg, tmp_path):
    with pytest.raises(SystemExit, match='its fc6 is for 32x32 inputs, but --insize is 64'):
        frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--insize', '64'))


def test_print_report_writes_plain_lines_into_files():
    """Chainer's PrintReport erases the screen (ESC[J) before every line: right at a terminal, noise in a batch
    job's log file."""
    import io

    from ucf.runcontrol import PlainLines

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stream, kept in ((io.StringIO(), False), (Terminal(), True)):
        out = PlainLines(stream)
        out.write('\033[J')
        out.write('1  0.5\n')
        assert stream.getvalue() == ('\033[J' if kept else '') + '1  0.5\n'


def test_progress_counts_the_iterations_the_run_makes(tiny_ucf, small_vgg, tmp_path, capsys):
    """72 training clips in batches of 16: 2 epochs are 9 iterations (batches run on across epochs), not 10; the
    progress line used to end at 9/10 ("103/108" on a larger run)."""
    frameBasedTrain.main(train_args(tiny_ucf, small_vgg, tmp_path, '--epoch', '2', '--batchsize', '16',
                                    '--log-interval', '1'))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('iteration ')]
    assert lines and lines[-1].startswith('iteration 9/9 (100.0%)'), lines[-3:]
