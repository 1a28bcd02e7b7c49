import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import synthetic_ucf101  # noqa: E402
from ucf.flow import FlowSettings  # noqa: E402

FLOW = FlowSettings('dis-ultrafast', 3, 4.0, True)  # the tests' flow stream: stacks of 3 fields

# The real UCF-101 split files live in ../shared beside the checkout (CI puts them there); UCF_LISTS overrides.
REAL_LISTS = os.environ.get('UCF_LISTS', os.path.join(ROOT, '..', 'shared', 'ucfTrainTestlist'))


@pytest.fixture(scope='session')
def real_lists():
    if not os.path.isfile(os.path.join(REAL_LISTS, 'classInd.txt')):
        pytest.skip(f'real UCF-101 split lists not found at {REAL_LISTS} (set UCF_LISTS)')
    return REAL_LISTS


@pytest.fixture(scope='session')
def tiny_ucf(tmp_path_factory):
    """A tiny synthetic UCF-101: 4 classes (one motion pair), 25 groups x 1 clip, 64x48, 12-40 frames.

    Returns (root, {relative clip path: frames written}).
    """
    root = str(tmp_path_factory.mktemp('tiny_ucf'))
    written = synthetic_ucf101.make_dataset(root, n_classes=4, n_pairs=1, groups=25, clips_per_group=(1, 1),
                                            frames=(12, 40), width=64, height=48, seed=1)
    return root, written


@pytest.fixture(scope='session')
def small_vgg(tmp_path_factory):
    """A VGG.model of VGG16's structure, narrow and for 32x32 inputs (fast), with calibrated random weights."""
    import numpy as np
    import VGGNet
    path = str(tmp_path_factory.mktemp('vgg') / 'VGG.model')
    np.random.seed(0)
    model = VGGNet.VGGNet(32, (4, 4, 8, 8, 8), 32)
    VGGNet.calibrate_random(model)
    VGGNet.save_model(model, path, {'source': 'random-init(test)'})
    return path


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory, small_vgg, tiny_ucf):
    """A VGG_1024.model for the tiny set (4 classes, 16-d fc7, 32x32 input), not trained: extraction only
    needs some fixed function of the frames."""
    import VGGNet
    import VGGNet_1024
    path = str(tmp_path_factory.mktemp('model') / 'VGG_1024.model')
    vgg, _ = VGGNet.load_vgg(small_vgg)
    VGGNet.save_model(VGGNet_1024.from_vgg(vgg, n_classes=4, feature_size=16, seed=0), path, {'source': 'test'})
    return path


@pytest.fixture(scope='session')
def flow_model(tmp_path_factory, small_vgg):
    """A VGG_1024_flow.model for the tiny set: 2L = 6 input channels, cross-modality initialised, not trained."""
    import VGGNet
    import VGGNet_1024
    path = str(tmp_path_factory.mktemp('flow_model') / 'VGG_1024_flow.model')
    vgg, _ = VGGNet.load_vgg(small_vgg)
    model = VGGNet_1024.from_vgg(vgg, n_classes=4, feature_size=16, seed=0, in_channels=2 * FLOW.stack)
    VGGNet.save_model(model, path, {'source': 'test', 'step': 'frameBasedTrain.py', 'split': 1, 'stream': 'flow',
                                    'flow': FLOW._asdict()})
    return path


def extraction_args(tiny_ucf, model, work, *extra):
    root, _ = tiny_ucf
    return ['--data', os.path.join(root, 'UCF-101'), '--lists', os.path.join(root, 'ucfTrainTestlist'),
            '--model', model, '--features-dir', os.path.join(work, 'UCF-101_features'),
            '--predictions-dir', os.path.join(work, 'UCF-101_framePrediction'),
            '--log-dir', os.path.join(work, 'extraction_logs'), '--batchsize', '8', *extra]


@pytest.fixture(scope='session')
def extracted(tmp_path_factory, tiny_ucf, tiny_model):
    """The tiny set's features and predictions, extracted in 3 shards by the local runner."""
    import generate_pbs
    work = str(tmp_path_factory.mktemp('extracted'))
    generate_pbs.main(['--scheduler', 'local', '--num-shards', '3', '--log-dir', os.path.join(work, 'jobs'),
                       '--'] + extraction_args(tiny_ucf, tiny_model, work))
    return work
