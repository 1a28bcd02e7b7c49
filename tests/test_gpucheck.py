"""gpucheck.py on the CPU (--device @numpy --small): the same stages a GPU node runs, on a bundle made here."""
import json
import os

import numpy as np
import pytest

from helperFunctions import read_split
from tools import gpucheck


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('bundle'))
    gpucheck.make_bundle(folder, small=True, wheels=False)
    return folder


def test_bundle_stands_in_for_every_listed_clip(bundle, tmp_path):
    data, lists = gpucheck.materialise(bundle, str(tmp_path))
    listed = read_split(lists, 1, 'train') + read_split(lists, 1, 'test')
    assert len(listed) == 100
    for clip in listed:  # each a link to a real clip of its own class
        path = os.path.join(data, clip.path)
        target = os.path.realpath(path)
        assert os.path.islink(path) and os.path.getsize(target) > 0
        assert os.path.basename(os.path.dirname(target)) == clip.path.split('/')[0]
    distinct = {os.path.realpath(os.path.join(data, c.path)) for c in listed}
    assert len(distinct) == 4  # the small bundle: one clip per class


def test_cpu_run_checks_stock_against_fast_and_reports(bundle, tmp_path, capsys):
    out = str(tmp_path / 'report')
    report = gpucheck.main(['--bundle', bundle, '--device', '@numpy', '--small', '--out', out])
    assert not report['errors'], report['errors']
    checks = {row['check'].split(':')[0] for row in report['correctness']}
    assert {'VGG16 forward', 'fine-tuning step', 'extraction shard', 'rnn.py, 3 iterations'} <= checks
    assert all(row['ok'] for row in report['correctness'])
    # stock Chainer against fast_conv: a real comparison, not the same code twice
    assert 0 < max(r['difference'] for r in report['correctness'] if r['check'].startswith('VGG16')) < 1e-4
    speeds = {row['what'].split(',')[0]: row for row in report['speed']}
    assert {'VGG16 forward', 'fine-tuning', 'extraction end to end', 'LSTM training step'} <= set(speeds)
    assert all(row['chainer'] > 0 for row in report['speed'])
    with open(os.path.join(out, 'report.json')) as f:
        assert json.load(f)['correctness'] == json.loads(json.dumps(report['correctness']))
    text = open(os.path.join(out, 'report.md')).read()
    assert '## Correctness' in text and 'FAIL' not in text
    assert 'gpucheck: correct' in capsys.readouterr().out


def test_a_difference_beyond_the_tolerance_fails_the_run(bundle, tmp_path, monkeypatch):
    real = gpucheck.check_vgg_forward

    def off_by_a_little(*args):
        rows = real(*args)
        rows[0]['difference'] = 1e-3
        return rows
    monkeypatch.setattr(gpucheck, 'check_vgg_forward', off_by_a_little)
    with pytest.raises(SystemExit) as e:
        gpucheck.main(['--bundle', bundle, '--device', '@numpy', '--small', '--out', str(tmp_path / 'r')])
    assert e.value.code == 1
    assert '| VGG16 forward: fc7 feature | 1.0e-03 | FAIL |' in open(tmp_path / 'r' / 'report.md').read()


def test_relative_difference():
    a = np.array([1.0, -2.0, 4.0])
    assert gpucheck.relative_difference(a, a) == 0
    assert gpucheck.relative_difference(a + [0, 0, 0.004], a) == pytest.approx(1e-3)
    assert gpucheck.relative_difference(a[:2], a) == float('inf')


def test_missing_bundle_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match='make gpu-bundle'):
        gpucheck.main(['--bundle', str(tmp_path / 'none'), '--device', '@numpy'])
