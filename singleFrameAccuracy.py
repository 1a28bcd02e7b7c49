"""Part 2: single-frame classification of the test clips from the per-frame softmax of VGGNet_1024.

    python singleFrameAccuracy.py

A clip's prediction is the sum over its frames of the log softmax (the product of the frame probabilities),
as in the handout. Prints `Accuracy(top 1, top 5, top 10): (a,b,c)` with the number of clips scored, and
writes singleFrame_results.npz (per-clip scores, for the comparison with the LSTM) and, in --out, the
confusion matrix (PNG, CSV), the per-class accuracy (CSV) and the most confused class pairs.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import os

import h5py
import numpy as np

from confusion import report_model, save_results
from ucf.errors import DataError
from ucf.files import refuse_overwriting_inputs
from ucf.flags import HelpFormatter
from ucf.packed_hdf5 import file_provenance, read_clip, read_hdf5_header
from ucf.provenance import make_provenance, provenance_text
from ucf.runcontrol import exit_on_user_error

LOG_FLOOR = 1e-30  # a float32 softmax can underflow to 0; log(0) would make one frame veto a class


def clip_scores(path):
    """(clip names, labels, scores clips x classes, class names, split, provenance record) of a
    testPredictions file."""
    header = read_hdf5_header(path, expect_subset='test')
    if header.get('kind') != 'predictions':
        raise DataError(f'{path} holds {header.get("kind")}, not per-frame predictions; '
                        'pass testPredictions1024.hdf5')
    scores, labels = np.empty((len(header['clips']), len(header['classes'])), np.float64), []
    with h5py.File(path, 'r') as f:
        for i, name in enumerate(header['clips']):
            prob, label = read_clip(f, name)
            scores[i] = np.log(np.maximum(prob.astype(np.float64), LOG_FLOOR)).sum(axis=0)
            labels.append(label)
    return header['clips'], np.array(labels), scores, header['classes'], header['split'], file_provenance(path, header)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--predictions', default='testPredictions1024.hdf5')
    p.add_argument('--results', default='singleFrame_results.npz', help='per-clip scores, for confusion.py')
    p.add_argument('--out', '-o', default='report', help='folder for the confusion matrix and tables')
    args = p.parse_args(argv)
    with exit_on_user_error():
        refuse_overwriting_inputs({'--predictions': args.predictions}, {'--results': args.results})
        clips, labels, scores, classes, split, source = clip_scores(args.predictions)
        save_results(args.results, clips, labels, scores, classes, split=split, model='single frame',
                     provenance=provenance_text(make_provenance('singleFrameAccuracy.py', input=source)))
        os.makedirs(args.out, exist_ok=True)
        accuracies, _ = report_model(dict(labels=labels, scores=scores, classes=np.array(classes)),
                                     os.path.join(args.out, 'singleFrame'), 'single frame')
    return accuracies


if __name__ == '__main__':
    main()
