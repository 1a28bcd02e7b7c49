"""The results file: for every test clip a model scored, its name, label and class scores, with the class names,
the split, which model made them and the record of what it was made from. singleFrameAccuracy.py and rnn.py
write one each; confusion.py and the demo read them. `Results` is the only code that knows the file's layout, and
where a wrong file is refused (not a results file, another model's, another extraction's).
"""
import os
import sys
import zipfile

import numpy as np
from sklearn.metrics import confusion_matrix, top_k_accuracy_score

from ucf.errors import DataError, warn
from ucf.files import atomic_path
from ucf.provenance import parse_provenance, same_extraction
from ucf.streams import STREAMS

TOPK = (1, 5, 10)  # the handout's accuracies


def topk_accuracies(labels, scores, ks=TOPK):
    """Top-k accuracy for each k; a k at or beyond the number of classes is 1 by definition."""
    n_classes = scores.shape[1]
    if n_classes == 2:  # scikit-learn reads two columns as a binary problem and wants one column of scores
        return tuple(1.0 if k >= 2 else float(np.mean(np.argmax(scores, axis=1) == labels)) for k in ks)
    return tuple(1.0 if k >= n_classes else
                 float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes))) for k in ks)


def format_accuracy(accuracies):
    """The handout's line, e.g. 'Accuracy(top 1, top 5, top 10): (0.626,0.853,0.915)'."""
    return 'Accuracy(top 1, top 5, top 10): (' + ','.join(f'{a:.3f}' for a in accuracies) + ')'


LOG_FLOOR = 1e-30  # a float32 softmax can underflow to 0; log(0) would make one frame veto a class


def single_frame_score(probabilities, weights=(1.0,)):
    """A clip's single-frame score (classes): the sum over its frames of the log of their probabilities (frames x
    classes; of one stream, or of several whose frames pair one to one, averaged with `weights`)."""
    prob = sum(w * p.astype(np.float64) for w, p in zip(weights, probabilities))
    return np.log(np.maximum(prob, LOG_FLOOR)).sum(axis=0)


def per_class_accuracy(counts):
    """Recall of each class from a confusion count matrix (NaN for a class with no test clip)."""
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.diag(counts) / counts.sum(axis=1)


# The models whose results confusion.py compares: the flag that takes each one's file, and the step that writes it.
WRITERS = {'single frame': ('--single', 'singleFrameAccuracy.py'), 'lstm': ('--lstm', 'rnn.py')}
KEYS = ('clips', 'labels', 'scores', 'classes')


class Results:
    """The per-clip test scores of one model. `info` holds what the file records besides: split, model ('single
    frame', 'lstm'), inference (rnn.py's technique), provenance (the record's text)."""

    def __init__(self, clips, labels, scores, classes, **info):
        self.clips, self.labels = np.asarray(clips), np.asarray(labels, np.int32)
        self.scores, self.classes = np.asarray(scores, np.float32), list(classes)
        self.info = info

    @property
    def model(self):
        return self.info.get('model')

    @property
    def split(self):
        return self.info.get('split')

    @property
    def stream(self):
        return self.info.get('stream', 'rgb')

    @property
    def label(self):
        """What made these results, in words: 'single frame', 'LSTM (flow)', 'two-stream single frame', ..."""
        model = {'lstm': 'LSTM'}.get(self.model, self.model or 'model')
        return (f'two-stream {model}' if self.stream == 'two-stream' else
                model + (f' ({self.stream})' if self.stream != 'rgb' else ''))

    @property
    def prefix(self):
        """The report's file names for these results: singleFrame, lstm_flow, singleFrame_twostream, ..."""
        return {'single frame': 'singleFrame'}.get(self.model, self.model or 'model') + STREAMS[self.stream].suffix

    @property
    def provenance(self):
        """The record of what made these results ({'source': 'unknown'} for a file from before records)."""
        return parse_provenance(self.info.get('provenance'))

    def topk(self, ks=TOPK):
        return topk_accuracies(self.labels, self.scores, ks)

    def confusion(self):
        """Counts, true class by predicted class (the top-1)."""
        return confusion_matrix(self.labels, self.scores.argmax(axis=1), labels=np.arange(len(self.classes)))

    def per_class(self):
        return per_class_accuracy(self.confusion())

    def restrict(self, clips):
        """These results on the given clips only (in this file's order)."""
        keep = np.array([c in clips for c in self.clips], bool)
        return Results(self.clips[keep], self.labels[keep], self.scores[keep], self.classes, **self.info)

    def save(self, path):
        with atomic_path(path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, clips=np.array(self.clips), labels=self.labels, scores=self.scores,
                     classes=np.array(self.classes), **{k: np.array(v) for k, v in self.info.items()})

    @classmethod
    def load(cls, path, model=None):
        """The results file at `path`; DataError for a file that is not one (truncated, text, another .npz) or that
        holds another model's results than `model` ('single frame' or 'lstm') where given."""
        if not os.path.isfile(path):
            raise DataError(f'{path}: results file not found; singleFrameAccuracy.py and rnn.py write them')
        try:
            with np.load(path) as f:
                stored = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as e:  # text, .npy, cut short
            raise DataError(f'{path}: not a readable results file ({type(e).__name__}: {str(e)[:120]}); rerun '
                            'singleFrameAccuracy.py or rnn.py, which write it') from None
        missing = [k for k in KEYS if k not in stored]
        if missing:
            raise DataError(f'{path} holds no {", ".join(missing)}: it is not a results file of '
                            'singleFrameAccuracy.py or rnn.py')
        info = {k: v[()].item() if isinstance(v[()], np.generic) else v[()] for k, v in stored.items()
                if k not in KEYS}
        results = cls(stored['clips'], stored['labels'], stored['scores'], stored['classes'], **info)
        held = None if results.model is None else str(results.model)
        if model and held is None:  # a file from before results named their model: the flag that took it does
            results.info['model'] = model
        if model and held and held != model:
            flag, writer = WRITERS[model]
            raise DataError(f'{path} holds the results of the {held} model, not of the {model} model: {flag} takes '
                            f'the file that {writer} writes (were --single and --lstm swapped?)')
        return results


def comparable(first, second, first_path, second_path):
    """DataError unless two results (of any models and streams) can be compared clip by clip: one split, one
    class list, and test clips of which one file's are the other's (normalizeData.py may leave a few out)."""
    if first.split is not None and second.split is not None and first.split != second.split:
        raise DataError(f'{first_path} holds results on the test clips of split {first.split} but {second_path} of '
                        f'split {second.split}: compare results of one split')
    if first.classes != second.classes:
        raise DataError(f'{first_path} and {second_path} score other classes: compare results of one class list')
    mine, theirs = set(first.clips), set(second.clips)
    if not (mine <= theirs or theirs <= mine):
        raise DataError(f'{first_path} and {second_path} were scored on other test clips ({len(mine - theirs)} only '
                        f'in the first, {len(theirs - mine)} only in the second): compare results of one test list')


def same_features(first, second, first_path, second_path):
    """The two results' provenance records; DataError when their inputs came from different extractions."""
    sources = [first.provenance, second.provenance]
    a, b = same_extraction(*sources, first_path, second_path,
                           'compare results of one extraction (rerun singleFrameAccuracy.py or rnn.py on it)')
    if not (a and b):
        warn('a results file records no extraction (written by an older version): cannot check that both '
             'models saw the same features')
    return sources


def on_common_clips(first, second, stream=None):
    """Both results on the clips both scored (normalizeData.py may have left some out of the LSTM's), with a
    note when that is fewer than either holds; DataError for results over different classes."""
    if first.classes != second.classes:
        raise DataError('the two results files have different class lists')
    if sorted(first.clips) != sorted(second.clips):
        common = set(first.clips) & set(second.clips)
        print(f'note: comparing on the {len(common)} clips both models scored', file=stream or sys.stdout)
        first, second = first.restrict(common), second.restrict(common)
    return first, second
