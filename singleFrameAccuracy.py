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

import numpy as np

from ucf.files import check_outputs
from ucf.flags import HelpFormatter
from ucf.packed_hdf5 import PackedFile
from ucf.provenance import make_provenance, provenance_text
from ucf.report import report_model
from ucf.results import Results
from ucf.runcontrol import exit_on_user_error

LOG_FLOOR = 1e-30  # a float32 softmax can underflow to 0; log(0) would make one frame veto a class


def clip_scores(packed):
    """(scores clips x classes) of a packed file of per-frame predictions: each clip's log softmax summed over
    its frames."""
    scores = np.empty((len(packed), len(packed.classes)), np.float64)
    for i, (_, _, prob) in enumerate(packed.items()):
        scores[i] = np.log(np.maximum(prob.astype(np.float64), LOG_FLOOR)).sum(axis=0)
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--predictions', default='testPredictions1024.hdf5')
    p.add_argument('--results', default='singleFrame_results.npz', help='per-clip scores, for confusion.py')
    p.add_argument('--out', '-o', default='report', help='folder for the confusion matrix and tables')
    args = p.parse_args(argv)
    with exit_on_user_error():
        check_outputs({'--predictions': args.predictions}, {'--results': args.results}, {'--out': args.out})
        predictions = PackedFile(args.predictions, kind='predictions', subset='test')
        results = Results(predictions.names, predictions.labels, clip_scores(predictions), predictions.classes,
                          split=predictions.split, model='single frame', provenance=provenance_text(
                              make_provenance('singleFrameAccuracy.py', input=predictions.record)))
        results.save(args.results)
        os.makedirs(args.out, exist_ok=True)
        accuracies, _ = report_model(results, os.path.join(args.out, 'singleFrame'), 'single frame')
    return accuracies


if __name__ == '__main__':
    main()
