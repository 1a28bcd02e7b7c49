"""Part 3: sequences, truncated BPTT, loss weighting, inference techniques and resume, on synthetic HDF5."""
import json
import os
import re

import chainer
import chainer.functions as F
import numpy as np
import pytest

import rnn
from helperFunctions import pad_sequence, repeatSequence
from ucf import fast_lstm
from ucf.packed_hdf5 import write_packed

CLASSES = ['Down', 'Still', 'Up']


def motion_clip(label, n, rng, dim=6):
    """Features whose first dimension drifts down, stays, or drifts up: only the order in time tells."""
    x = rng.normal(0, 0.3, (n, dim)).astype(np.float32)
    x[:, 0] = rng.uniform(-1, 1) + (label - 1) * np.linspace(0, 3, n) + rng.normal(0, 0.1, n)
    return x


@pytest.fixture(scope='module')
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp('features')
    rng = np.random.RandomState(0)
    for subset, count in (('train', 90), ('test', 30)):
        items = [(f'{CLASSES[i % 3]}/v_{CLASSES[i % 3]}_g{i:02d}_c01', i % 3,
                  motion_clip(i % 3, rng.randint(10, 40), rng)) for i in range(count)]
        write_packed(str(folder / f'{subset}.hdf5'), items, len(items), CLASSES, split=1, subset=subset,
                     kind='normalized features')
    return folder


def rnn_args(features, out, *extra):
    return ['--train', str(features / 'train.hdf5'), '--test', str(features / 'test.hdf5'), '--out', str(out),
            '--model-out', str(out / 'rnn.model'), '--results', str(out / 'lstm_results.npz'),
            '--hidden', '16', '--fc', '16', '--seqlen', '12', '--bptt', '4', '--batchsize', '10', '--lr', '0.01',
            *extra]


def test_short_clips_are_padded_and_long_ones_give_random_segments():
    rng = np.random.RandomState(0)
    short = np.arange(5, dtype=np.float32)[:, None]
    assert np.array_equal(rnn.training_sequence(short, 12, rng), repeatSequence(short, 12))
    long = np.arange(100, dtype=np.float32)[:, None]
    starts = set()
    for _ in range(30):
        seq = rnn.training_sequence(long, 12, rng)[:, 0]
        assert np.array_equal(np.diff(seq), np.ones(11))  # a contiguous segment
        starts.add(seq[0])
    assert len(starts) > 10 and max(starts) <= 88
    strided = rnn.training_sequence(long, 12, np.random.RandomState(1), max_stride=3)[:, 0]
    assert len(set(np.diff(strided))) == 1 and len(strided) == 12


def backward_steps(sequence):
    """The fraction of frame-to-frame steps of a forward ramp that go backwards (reversed motion)."""
    return float((np.diff(sequence[:, 0]) < 0).mean())


@pytest.mark.parametrize('mode, most_backward', [('reverse', 0.4), ('loop', 0.12), ('hold', 0.0), ('crop', 0.0)])
def test_padding_rules_and_the_motion_they_put_in(mode, most_backward):
    """An 'Up' clip of 9 frames made 64 long: the handout's rule plays it backwards for about half of the
    sequence (38% of its steps go backwards: a Walk walks backwards); loop jumps back once per repeat (11%, one
    step in 9); hold and crop add no motion."""
    clip = np.arange(9, dtype=np.float32)[:, None]
    padded = pad_sequence(clip, 64, mode)
    assert len(padded) == (9 if mode == 'crop' else 64) and np.array_equal(padded[:9], clip)
    if mode == 'reverse':
        assert np.array_equal(padded, repeatSequence(clip, 64)) and 0.35 < backward_steps(padded) <= most_backward
    else:
        assert backward_steps(padded) <= most_backward
    if mode == 'hold':
        assert (padded[9:] == 8).all()
    assert np.array_equal(pad_sequence(np.arange(100)[:, None], 64, mode), np.arange(64)[:, None])  # long: cut


def test_crop_cuts_the_batch_to_its_shortest_clip():
    batch = [(np.ones((n, 3), np.float32), 0) for n in (12, 7, 12)]
    x, t = rnn.crop_to_shortest(batch)
    assert x.shape == (3, 7, 3) and t.shape == (3,)


@pytest.mark.parametrize('mode', ['reverse', 'crop'])
def test_padding_is_counted_and_used(mode, features, tmp_path, capsys):
    """rnn.py says how many training and test clips its --padding rule pads; --padding crop trains on batches cut
    to their shortest clip (nothing padded)."""
    import h5py
    with h5py.File(features / 'train.hdf5', 'r') as f:
        short = sum(f[n].shape[0] < 30 for n in (c.decode() for c in f['_index/clips'][()]))
    rnn.main(rnn_args(features, tmp_path, '--epoch', '1', '--seqlen', '30', '--padding', mode))
    err = capsys.readouterr().err
    assert re.search(rf'padding \(--padding {mode}: .*\): {short} of 90 training clips are shorter than --seqlen 30, '
                     r'and \d+ of 30 test clips \(their \[segments\] sequences\)', err), err
    assert 0 < short < 90


def test_segment_starts():
    assert rnn.segment_starts(50, 120, 5) == [0]
    assert rnn.segment_starts(220, 120, 5) == [0, 25, 50, 75, 100]
    assert rnn.segment_starts(122, 120, 5) == [0, 1, 2]


def test_loss_weights():
    assert np.allclose(rnn.loss_weights(4, 'uniform'), 1)
    linear = rnn.loss_weights(4, 'linear')
    assert np.allclose(linear.mean(), 1) and np.all(np.diff(linear) > 0)
    assert rnn.loss_weights(4, 'last').tolist() == [0, 0, 0, 4]


def make_updater(model, seqlen, bptt, weighting='uniform'):
    rng = np.random.RandomState(0)
    data = [(rng.normal(size=(seqlen, 6)).astype(np.float32), np.int32(i % 3)) for i in range(6)]
    optimizer = chainer.optimizers.SGD(lr=0.1)
    optimizer.setup(model)
    iterator = chainer.iterators.SerialIterator(data, 6, shuffle=False)
    return rnn.BPTTUpdater(iterator, optimizer, chainer.get_device('@numpy'), bptt, weighting), optimizer


def run_update(updater, model):
    reporter = chainer.Reporter()
    reporter.add_observer('main', model)
    observation = {}
    with reporter.scope(observation):
        updater.update()
    return observation


def test_truncated_bptt_carries_state_and_cuts_the_graph():
    np.random.seed(0)
    model = rnn.RNN(6, 8, 2, 8, 3)
    updater, optimizer = make_updater(model, 10, 4)
    run_update(updater, model)
    assert optimizer.t == 3  # chunks of 4, 4 and 2 steps: three updates
    for c, h in model.state:  # the state survives the chunks, but without a graph behind it
        assert c is not None and h.creator is None and c.creator is None
    # Carrying the state matters: the next chunk's output differs from one computed from a fresh state.
    x = np.random.RandomState(1).normal(size=(2, 3, 6)).astype(np.float32)
    with chainer.using_config('train', False):
        model.reset_state()
        model(x)
        carried = model(x).array
        model.reset_state()
        fresh = model(x).array
    assert not np.allclose(carried, fresh)


def test_last_step_weighting_only_trains_on_the_last_chunk():
    np.random.seed(0)
    model = rnn.RNN(6, 8, 1, 8, 3)
    before = model.out.W.array.copy()
    updater, optimizer = make_updater(model, 8, 4, 'last')
    updater.bptt = 8  # one chunk: the update comes from the last step alone
    observation = run_update(updater, model)
    assert observation['main/loss'] > 0 and not np.array_equal(before, model.out.W.array)
    np.random.seed(0)
    model = rnn.RNN(6, 8, 1, 8, 3)
    updater, optimizer = make_updater(model, 8, 4, 'last')
    updates = []
    original = optimizer.update
    optimizer.update = lambda *a: (updates.append(float(np.abs(model.out.W.grad).sum())), original(*a))[1]
    run_update(updater, model)
    # steps 0-3 have weight 0: that chunk runs forward only (to carry the state) and costs no update, no backward
    assert len(updates) == 1 and updates[0] > 0 and optimizer.t == 1


def test_each_chunk_update_is_its_own_chunks_mean():
    """A chunk's update is the mean loss over its own steps (not that sum divided by the whole sequence's
    steps): with plain SGD, a sequence cut into chunks trains each at the learning rate the flag says."""
    np.random.seed(0)
    model = rnn.RNN(6, 8, 1, 8, 3)
    reference = model.copy(mode='copy')
    updater, optimizer = make_updater(model, 8, 4)
    seen = []
    original = optimizer.update
    optimizer.update = lambda *a: (seen.append(model.out.b.grad.copy()), original(*a))[1]
    run_update(updater, model)
    x, t = chainer.dataset.concat_examples(updater.get_iterator('main').dataset)
    reference.reset_state()
    y = reference(x[:, :4])
    loss = F.softmax_cross_entropy(F.reshape(y, (-1, 3)), np.repeat(t, 4))  # the mean over the first chunk
    reference.cleargrads()
    loss.backward()
    assert len(seen) == 2 and np.allclose(seen[0], reference.out.b.grad, rtol=1e-5, atol=1e-7)


def reference_lstm(model, x, state=None):
    """The same network built from Chainer's own pieces, one F.lstm step at a time (the arithmetic LSTMChunk
    must reproduce): x (batch, time, n_in) -> scores (batch, time, classes) and the final state of each layer."""
    batch, steps = x.shape[:2]
    state = list(state or [(None, None)] * model.n_layers)
    h_seq = [x[:, t] for t in range(steps)]
    for layer in range(model.n_layers):
        c, h = state[layer]
        outputs = []
        for t in range(steps):
            z = model.upward[layer](h_seq[t])
            if h is not None:
                z = z + model.lateral[layer](h)
            c, h = F.lstm(c if c is not None else np.zeros((batch, model.n_hidden), np.float32), z)
            outputs.append(h)
        state[layer] = (c, h)
        h_seq = outputs
    h = F.reshape(F.stack(h_seq, axis=1), (batch * steps, model.n_hidden))
    return F.reshape(model.out(F.sigmoid(model.fc(h))), (batch, steps, -1)), state


@pytest.mark.parametrize('by_exp', [True, False], ids=['cpu-exp', 'gpu-arithmetic'])
@pytest.mark.parametrize('layers, steps', [(1, 7), (2, 5)])
def test_lstm_layer_is_chainer_lstm_step_by_step(layers, steps, by_exp, monkeypatch):
    """LSTMLayer against F.lstm: the outputs, the carried state and every gradient (parameters, input, incoming
    state), at the handout's gate order, with a state carried in from a previous chunk and saturated gates; both
    the CPU's exp arithmetic and the one a GPU runs (here on numpy)."""
    monkeypatch.setattr(fast_lstm.LSTMLayer, 'BY_EXP', by_exp)
    rng = np.random.RandomState(layers)
    model = rnn.RNN(12, 16, layers, 10, 5)
    for p in model.params():
        p.array[...] = rng.normal(0, 0.6, p.shape)  # large weights: some gates saturate (exp over/underflows)
    x = rng.normal(0, 2, (4, steps, 12)).astype(np.float32)
    x[0, 0, :] = 40  # drives the first clip's gates to 0 and 1 exactly
    state = [(chainer.Variable(rng.normal(size=(4, 16)).astype(np.float32)),
              chainer.Variable(rng.normal(size=(4, 16)).astype(np.float32))) for _ in range(layers)]
    probe = rng.normal(size=(4, steps, 5)).astype(np.float32)
    results = []
    for run in ('chunk', 'reference'):
        copy = model.copy(mode='copy')
        xv = chainer.Variable(x.copy())
        carried = [(chainer.Variable(c.array.copy()), chainer.Variable(h.array.copy())) for c, h in state]
        if run == 'chunk':
            copy.state = list(carried)
            y, final = copy(xv), copy.state
        else:
            y, final = reference_lstm(copy, xv, carried)
        loss = F.sum(y * probe) + sum(F.sum(c * c) + F.sum(h) for c, h in final)
        copy.cleargrads()
        loss.backward()
        grads = {name: p.grad.copy() for name, p in copy.namedparams()}
        grads['x'] = xv.grad
        for k, (c, h) in enumerate(carried):
            grads[f'c{k}'], grads[f'h{k}'] = c.grad, h.grad
        results.append((y.array, [(c.array, h.array) for c, h in final], grads))
    (y, final, grads), (want_y, want_final, want_grads) = results
    assert np.allclose(y, want_y, rtol=1e-5, atol=1e-6)
    for (c, h), (want_c, want_h) in zip(final, want_final):
        assert np.allclose(c, want_c, rtol=1e-5, atol=1e-6) and np.allclose(h, want_h, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        scale = np.abs(want_grads[name]).max()
        assert np.allclose(grads[name], want_grads[name], rtol=1e-4, atol=1e-5 * scale), name


def test_lean_adam_is_chainers_adam_bit_for_bit():
    """LeanAdam (cache-sized blocks, side by side on the CPUs) against chainer.optimizers.Adam: the same
    parameters, bit for bit, after several updates of parameters large and small."""
    rng = np.random.RandomState(0)
    shapes = [(300, 700), (700,), (3, 5), (1,)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) * 10 ** rng.uniform(-4, 1) for s in shapes] for _ in range(4)]
    finals = []
    for optimizer in (fast_lstm.LeanAdam(alpha=1e-3), chainer.optimizers.Adam(alpha=1e-3)):
        model = chainer.ChainList(*[chainer.Link() for _ in shapes])
        for link, s in zip(model, start):
            with link.init_scope():
                link.p = chainer.Parameter(s.copy())
        optimizer.setup(model)
        for step in grads:
            for link, g in zip(model, step):
                link.p.grad = g.copy()
            optimizer.update()
        finals.append([link.p.array.copy() for link in model])
    for lean, stock in zip(*finals):
        assert np.array_equal(lean, stock)


def test_batched_inference_equals_one_clip_at_a_time(features):
    clips = rnn.open_features(str(features / 'test.hdf5'), 'test')
    np.random.seed(0)
    model = rnn.RNN(clips.dim, 8, 2, 8, 3)
    techniques = ['full', 'last', 'weighted', 'segments']
    batched = rnn.evaluate(model, clips, techniques, seqlen=12, segments=3, batchsize=7)
    for i in (0, 5, 17):
        x = clips.read(i)
        log_probs = rnn.step_log_probs(model, [x])[0]
        assert log_probs.shape == (len(x), 3)
        with chainer.using_config('train', False):  # the shared-projection path against the training forward
            model.reset_state()
            assert np.allclose(log_probs, F.log_softmax(model(x[None])[0]).array, atol=1e-5)
        assert np.allclose(batched['full'][i], log_probs.mean(axis=0), atol=1e-5)
        assert np.allclose(batched['last'][i], log_probs[-1], atol=1e-5)
        w = np.arange(1, len(x) + 1)
        assert np.allclose(batched['weighted'][i], (log_probs * w[:, None]).sum(0) / w.sum(), atol=1e-5)
        pieces = [repeatSequence(x[s:s + 12], 12) for s in rnn.segment_starts(len(x), 12, 3)]
        want = np.mean([p.mean(axis=0) for p in rnn.step_log_probs(model, pieces)], axis=0)
        assert np.allclose(batched['segments'][i], want, atol=1e-5)


def test_lstm_learns_order_in_time_and_resumes(features, tmp_path, capsys):
    final, _ = rnn.main(rnn_args(features, tmp_path, '--epoch', '2', '--inference', 'full', 'last'))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('snapshot')) == ['snapshot_iter_18',
                                                                                   'snapshot_iter_9']
    trainer, model, _, test, _ = rnn.make_trainer(rnn.parse_args(rnn_args(
        features, tmp_path, '--epoch', '30', '--inference', 'full', 'last', '--resume', 'auto')))
    assert trainer.updater.epoch == 2 and trainer.updater.iteration == 18
    trainer.run()
    out = capsys.readouterr().out
    assert 'epoch 30 test [full] Accuracy(top 1, top 5, top 10): (' in out
    scores = rnn.evaluate(model, test, ['last'], 12)['last']
    accuracy = (scores.argmax(axis=1) == test.labels).mean()
    assert accuracy > 0.8, accuracy  # chance is 1/3; only the direction of the drift tells Up from Down
    results = np.load(tmp_path / 'lstm_results.npz')
    assert results['scores'].shape == (30, 3) and list(results['classes']) == CLASSES
    for png in ('loss.png', 'accuracy.png'):
        assert (tmp_path / png).stat().st_size > 1000


def test_every_knob_runs(features, tmp_path):
    rnn.main(rnn_args(features, tmp_path, '--epoch', '1', '--lstm-layers', '2', '--batchnorm', '--dropout', '0.2',
                      '--grad-clip', '1', '--weight-decay', '1e-4', '--variable-length', '6',
                      '--loss-weighting', 'linear', '--noise', '0.1', '--max-stride', '2', '--optimizer',
                      'momentum', '--inference', 'segments', 'weighted', '--in-memory'))
    assert (tmp_path / 'rnn.model').exists()


def test_wrong_files_are_refused(features, tmp_path):
    with pytest.raises(SystemExit, match='holds the test clips, not the train ones'):
        rnn.main(rnn_args(features, tmp_path, '--train', str(features / 'test.hdf5')))
    with pytest.raises(SystemExit, match='nothing.hdf5: not found'):
        rnn.main(rnn_args(features, tmp_path, '--test', str(tmp_path / 'nothing.hdf5')))


def test_sweep_writes_one_table_and_skips_finished_runs(features, tmp_path, capsys):
    import rnnSweep
    common = rnn_args(features, tmp_path)[:4] + ['--hidden', '8', '--fc', '8', '--seqlen', '12', '--bptt', '6',
                                                 '--epoch', '1', '--inference', 'full', 'last']
    argv = ['--grid', 'lstm-layers=1,2', '--grid', 'batchnorm=on,off', '--out', str(tmp_path / 'sweep'), '--',
            *common]
    rows = rnnSweep.main(argv)
    assert len(rows) == 8 and {r['inference'] for r in rows} == {'full', 'last'}
    assert {r['configuration'] for r in rows} == {'lstm-layers=1_batchnorm=on', 'lstm-layers=1_batchnorm=off',
                                                 'lstm-layers=2_batchnorm=on', 'lstm-layers=2_batchnorm=off'}
    table = (tmp_path / 'sweep' / 'sweep_results.md').read_text()
    assert table.count('\n| lstm-layers=') == 8 and '| top1 |' in table
    model, = (tmp_path / 'sweep').glob('lstm-layers=2_batchnorm=on_*/rnn.model')
    stamp = model.stat().st_mtime_ns
    assert rnnSweep.main(argv) == rows and model.stat().st_mtime_ns == stamp  # nothing retrained
    # Another argument after `--` is another run: trained anew, never the stale numbers of the first.
    longer = ['--grid', 'lstm-layers=2', '--grid', 'batchnorm=on,off', '--out', str(tmp_path / 'sweep'), '--',
              *common, '--epoch', '2']
    rows = rnnSweep.main(longer)
    assert len(list((tmp_path / 'sweep').glob('lstm-layers=2_batchnorm=*_*'))) == 2 + 2
    assert model.stat().st_mtime_ns == stamp
    fresh = [p for p in (tmp_path / 'sweep').glob('lstm-layers=2_batchnorm=on_*') if p != model.parent]
    assert json.loads((fresh[0] / 'final.json').read_text())['settings']['epoch'] == 2


def test_resumed_lstm_run_is_the_interrupted_run(features, tmp_path):
    """Stopped after epoch 2 and resumed to 4: the same weights as 4 epochs in one go (sequence order, segments,
    lengths, noise and dropout all continue from the snapshot's random state)."""
    knobs = ['--noise', '0.1', '--max-stride', '2', '--dropout', '0.2', '--variable-length', '6']
    rnn.main(rnn_args(features, tmp_path / 'a', '--epoch', '2', *knobs))
    rnn.main(rnn_args(features, tmp_path / 'a', '--epoch', '4', '--resume', 'auto', *knobs))
    rnn.main(rnn_args(features, tmp_path / 'b', '--epoch', '4', *knobs))
    with np.load(tmp_path / 'a' / 'rnn.model') as a, np.load(tmp_path / 'b' / 'rnn.model') as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != 'provenance')
    with pytest.raises(SystemExit, match='other settings: --noise 0.1 there, 0.2 now'):
        rnn.main(rnn_args(features, tmp_path / 'a', '--epoch', '5', '--resume', 'auto', *knobs, '--noise', '0.2'))


def test_max_iterations_and_an_eta_that_counts_evaluation(features, tmp_path, capsys):
    final, _ = rnn.main(rnn_args(features, tmp_path, '--epoch', '9', '--max-iterations', '40'))
    err = capsys.readouterr().err
    log = json.loads((tmp_path / 'log').read_text())
    assert log[-1]['iteration'] == 36  # the per-epoch log stops at the last whole epoch (9 updates an epoch)
    with np.load(tmp_path / 'lstm_results.npz') as results:  # scored with the final weights (iteration 40)
        model = rnn.RNN(6, 16, 1, 16, 3)
        with np.load(tmp_path / 'rnn.model') as weights:
            for name, param in model.namedparams():
                param.array[...] = weights[name.lstrip('/')]
        test = rnn.open_features(str(features / 'test.hdf5'), 'test')
        fresh = rnn.evaluate(model, test, ['full'], 12)['full']
        assert np.allclose(results['scores'], fresh, atol=1e-5)
    # after the first evaluation the ETA includes the evaluations still to come
    assert re.search(r'iteration 20/40 .*ETA \S+ \(of which \S+ evaluation\)', err), err


def test_inference_techniques_are_one_table(features, monkeypatch, capsys):
    """--help lists every technique from rnn.INFERENCE, and a new entry is all a new technique needs."""
    with pytest.raises(SystemExit):
        rnn.parse_args(['--help'])
    shown = ' '.join(capsys.readouterr().out.split())
    for name, technique in rnn.INFERENCE.items():
        assert f'{name}: {" ".join(technique.help.split())}' in shown
    first_step = rnn.Technique(rnn.whole_clip, lambda log_probs: log_probs[0][0], False, 'the first step only')
    monkeypatch.setitem(rnn.INFERENCE, 'first', first_step)
    clips = rnn.open_features(str(features / 'test.hdf5'), 'test')
    np.random.seed(0)
    model = rnn.RNN(clips.dim, 8, 1, 8, 3)
    scores = rnn.evaluate(model, clips, ['full', 'first'], seqlen=12)
    for i in (0, 7):
        assert np.allclose(scores['first'][i], rnn.step_log_probs(model, [clips.read(i)])[0][0], atol=1e-5)
    assert rnn.parse_args(['--inference', 'first']).inference == ['first']
