"""Part 2: single-frame classification of the test clips from the per-frame softmax of VGGNet_1024.

    python singleFrameAccuracy.py
    python singleFrameAccuracy.py --stream flow            # the motion stream's (testPredictions1024_flow.hdf5)
    python singleFrameAccuracy.py --stream two-stream      # both, each frame's softmax averaged (--flow-weight)

A clip's prediction is the sum over its frames of the log softmax (the product of the frame probabilities),
as in the handout. Prints `Accuracy(top 1, top 5, top 10): (a,b,c)` with the number of clips scored, and
writes singleFrame_results.npz (per-clip scores, for the comparison with the LSTM) and, in --out, the
confusion matrix (PNG, CSV), the per-class accuracy (CSV) and the most confused class pairs.

Two-stream: each frame's probabilities are (1 - w) RGB + w flow, the streams' frames aligned one to one (frame t
of a clip in both: the flow stream's input for frame t is the stack that starts there); w is --flow-weight, set
before looking at any result (the literature's 1 : 1.5 of RGB to flow, Wang et al. 2016), not tuned on the test
set. It prints each stream's line and the fused one.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import os

import numpy as np

from ucf.files import check_outputs
from ucf.flags import HelpFormatter, fraction
from ucf.packed_hdf5 import PackedFile
from ucf.provenance import make_provenance, provenance_text
from ucf.report import report_model
from ucf.results import Results, format_accuracy, single_frame_score, topk_accuracies
from ucf.runcontrol import exit_on_user_error
from ucf.streams import StreamPath, add_stream_flag, add_stream_input, apply_stream, stream_path

def clip_scores(*streams, weights=(1.0,)):
    """(scores clips x classes) of packed files of per-frame predictions (one, or the two streams' aligned):
    each clip's single_frame_score."""
    return np.stack([single_frame_score([s.read(i) for s in streams], weights) for i in range(len(streams[0]))])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_stream_flag(p)
    add_stream_input(p, '--predictions', 'testPredictions1024.hdf5', 'per-frame predictions')
    p.add_argument('--flow-weight', type=fraction, default=0.6,
                   help="two-stream: the flow stream's share of each frame's probabilities")
    p.add_argument('--results', default=StreamPath('singleFrame_results.npz'), help='per-clip scores, for confusion.py')
    p.add_argument('--out', '-o', default='report', help='folder for the confusion matrix and tables')
    args = apply_stream(p.parse_args(argv))
    with exit_on_user_error():
        fused = args.stream == 'two-stream'
        check_outputs({'--predictions': args.predictions, **({'--flow-predictions': args.flow_predictions}
                                                               if fused else {})},
                      {'--results': args.results}, {'--out': args.out})
        predictions = PackedFile(args.predictions, kind='predictions', subset='test',
                                 stream='rgb' if fused else args.stream)
        if fused:
            flow = PackedFile(args.flow_predictions, kind='predictions', subset='test', stream='flow')
            predictions.check_aligned(flow)
            for name, packed in (('rgb', predictions), ('flow', flow)):
                print(f'{name} single frame: {format_accuracy(topk_accuracies(packed.labels, clip_scores(packed)))}')
            scores = clip_scores(predictions, flow, weights=(1 - args.flow_weight, args.flow_weight))
            inputs, info = dict(rgb=predictions.record, flow=flow.record), dict(flow_weight=args.flow_weight)
        else:
            scores, inputs, info = clip_scores(predictions), dict(input=predictions.record), {}
        results = Results(predictions.names, predictions.labels, scores, predictions.classes,
                          split=predictions.split, model='single frame', stream=args.stream, **info,
                          provenance=provenance_text(make_provenance('singleFrameAccuracy.py', **inputs, **info)))
        results.save(args.results)
        os.makedirs(args.out, exist_ok=True)
        accuracies, _ = report_model(results, os.path.join(args.out, stream_path('singleFrame', args.stream)),
                                     f'{"two-stream " if fused else ""}single frame'
                                     + (' (flow)' if args.stream == 'flow' else ''))
    return accuracies


if __name__ == '__main__':
    main()
