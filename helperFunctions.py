"""The handout's data module: UCF-101's split lists (classInd, train/testlist), the clips of a split on disk,
frame augmentation, and padding short feature sequences (repeatSequence, the handout's rule, and its alternatives).

How a frame is read is in ucf/video.py, how it becomes the network's input in ucf/preprocessing.py; docs/DESIGN.md
maps the rest.
"""
import collections
import os
import re

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import numpy as np

from ucf.errors import DataError, warn
from ucf.preprocessing import Augmentation


CLIP_NAME = re.compile(r'^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)(?P<ext>\.[^./]+)$', re.IGNORECASE)
# Containers a UCF-layout collection may hold (UCF-101 itself is all .avi; re-encoded and downloaded sets are not).
VIDEO_EXTENSIONS = ('.avi', '.mp4', '.m4v', '.mkv', '.webm', '.mov', '.mpg', '.mpeg', '.ts', '.wmv', '.flv',
                    '.ogv')

Clip = collections.namedtuple('Clip', 'path label')  # path relative to the data root, 0-based label


def _lines(path):
    if not os.path.isfile(path):
        raise DataError(f'{path}: split file not found. Point --lists at the folder holding classInd.txt, '
                        'trainlist01-03.txt and testlist01-03.txt (UCF101TrainTestSplits-RecognitionTask.zip).')
    with open(path, encoding='utf-8', newline='') as f:
        for number, line in enumerate(f, 1):
            line = line.strip()  # also removes the CR of the official CRLF files
            if line:
                yield number, line


def read_class_index(list_dir):
    """classInd.txt ('1 ApplyEyeMakeup' per line, 1-based) -> list of class names, index = 0-based label."""
    path = os.path.join(list_dir, 'classInd.txt')
    classes = {}
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f'{path}:{number}: expected "<index> <ClassName>", got {line!r}')
        index = int(parts[0])
        if index in classes or parts[1] in classes.values():
            raise DataError(f'{path}:{number}: class {line!r} is listed twice')
        classes[index] = parts[1]
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise DataError(f'{path}: class indices must run 1..{len(classes)} without gaps')
    return [classes[i] for i in range(1, len(classes) + 1)]


def _parse_clip(path, number, rel, classes):
    folder, _, name = rel.partition('/')
    if not name or '/' in name:
        raise DataError(f'{path}:{number}: expected "<Class>/v_<Class>_gGG_cCC.avi" (or another container), '
                        f'got {rel!r}')
    if folder not in classes:
        raise DataError(f'{path}:{number}: class folder {folder!r} is not in classInd.txt; '
                        'are the lists and classInd.txt from the same release?')
    m = CLIP_NAME.match(name)
    if not m:
        raise DataError(f'{path}:{number}: clip name {name!r} is not of the form v_<Class>_gGG_cCC.<ext>')
    if m.group('ext').lower() not in VIDEO_EXTENSIONS:
        raise DataError(f'{path}:{number}: clip {name!r} has extension {m.group("ext")!r}, which is not a video '
                        f'container this pipeline reads ({" ".join(VIDEO_EXTENSIONS)})')
    # UCF-101 itself names the files of folder HandstandPushups "v_HandStandPushups_*": compare without case.
    if m.group('cls').lower() != folder.lower():
        raise DataError(f'{path}:{number}: clip {name!r} is named for class {m.group("cls")!r} but listed in '
                        f'folder {folder!r}')
    return classes.index(folder)


def read_split(list_dir, split, subset):
    """Clips of 'train' or 'test' of split 1, 2 or 3, as a list of Clip(path, label)."""
    if split not in (1, 2, 3):
        raise DataError(f'split must be 1, 2 or 3, got {split!r}')
    if subset not in ('train', 'test'):
        raise DataError(f"subset must be 'train' or 'test', got {subset!r}")
    classes = read_class_index(list_dir)
    path = os.path.join(list_dir, f'{subset}list{split:02d}.txt')
    clips, seen = [], set()
    for number, line in _lines(path):
        parts = line.split()
        label = _parse_clip(path, number, parts[0], classes)
        if subset == 'train':
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f'{path}:{number}: expected "<Class>/<clip>.avi <class index>", got {line!r}')
            if int(parts[1]) - 1 != label:
                raise DataError(f'{path}:{number}: index {parts[1]} is class '
                                f'{classes[int(parts[1]) - 1] if 0 < int(parts[1]) <= len(classes) else "?"!r} in '
                                f'classInd.txt but the clip is in folder {classes[label]!r}')
        elif len(parts) != 1:
            raise DataError(f'{path}:{number}: expected "<Class>/<clip>.avi", got {line!r}')
        if parts[0] in seen:
            raise DataError(f'{path}:{number}: clip {parts[0]} is listed twice')
        seen.add(parts[0])
        clips.append(Clip(parts[0], label))
    if not clips:  # every step divides by, or indexes into, the clips of its split
        raise DataError(f'{path} lists no clips (an empty or cut file?); take the split files from '
                        'UCF101TrainTestSplits-RecognitionTask.zip again')
    return clips


def clip_group(rel_path):
    """Group number of a clip (clips of one group come from one long video and never straddle train/test)."""
    return int(CLIP_NAME.match(os.path.basename(rel_path)).group('group'))


def check_clips_on_disk(data_root, clips, allow_missing=False):
    """Clips whose file exists. Missing ones stop the run with their names unless allow_missing (then warn)."""
    if not os.path.isdir(data_root):
        raise DataError(f'{data_root}: data folder not found. Pass --data the folder that holds the 101 class '
                        'folders of UCF-101 (UCF-101/ApplyEyeMakeup/..., from UCF101.rar).')
    present = [c for c in clips if os.path.isfile(os.path.join(data_root, c.path))]
    missing = len(clips) - len(present)
    if clips and not present:  # --skip-missing or not: there is nothing to work on
        raise DataError(f'none of the {len(clips)} listed clips is under {data_root}/ (e.g. {clips[0].path}): '
                        'check --data (the folder that holds the 101 class folders) and --split')
    if missing:
        names = [c.path for c in clips if not os.path.isfile(os.path.join(data_root, c.path))]
        message = (f'{missing} of {len(clips)} listed clips are missing under {data_root}/, e.g. '
                   f'{", ".join(names[:3])}')
        if not allow_missing:
            raise DataError(message + '. Check --data and --split, or pass --skip-missing to go on without them.')
        warn(message + '; going on without them (--skip-missing).')
    return present


def random_augmentation(rng, width, height, flip=True, crop=False, resize=False, rotate=False,
                        crop_fraction=0.875, scale_range=(0.6, 1.0), max_angle=10.0):
    """Draw the handout's augmentations for one frame of size width x height.

    crop: a box of `crop_fraction` of each side at a random place (the 256->224 habit);
    resize: the box's size is drawn from `scale_range` instead (random zoom); rotate: +-max_angle degrees.
    """
    fraction = rng.uniform(*scale_range) if resize else crop_fraction if crop else 1.0
    box = None
    if fraction < 1.0:
        w, h = max(1, int(round(width * fraction))), max(1, int(round(height * fraction)))
        left, top = rng.randint(0, width - w + 1), rng.randint(0, height - h + 1)
        box = (left, top, left + w, top + h)
    angle = float(rng.uniform(-max_angle, max_angle)) if rotate else 0.0
    return Augmentation(bool(flip and rng.rand() < 0.5), box, angle)


def repeatSequence(sequence, length):
    """Pad a sequence shorter than `length` by appending it reversed (then forward, ...) until long enough.

    Going back and forth keeps the motion smooth at the seams, unlike starting over from the first frame.
    """
    n = len(sequence)
    if n == 0:
        raise ValueError('cannot pad an empty sequence')
    if n >= length:
        return sequence[:length]
    period = 2 * n
    index = np.arange(length) % period
    index = np.where(index < n, index, period - 1 - index)
    return sequence[index]


# How a clip shorter than a training sequence is made long enough (rnn.py --padding). The handout's rule plays it
# backwards and forwards again; that puts reversed motion into the sequence (a Walk walks backwards half the time).
PADDING = {
    'reverse': "play it backwards, then forwards again, ... (the handout's repeatSequence)",
    'loop': 'start it over from its first frame (one jump per repeat, motion always forwards)',
    'hold': 'repeat its last frame (no new motion after the clip ends)',
    'crop': "no padding: the batch is cut to its shortest clip's length (shorter sequences, nothing invented)",
}


def pad_sequence(sequence, length, mode='reverse'):
    """`sequence` made `length` long by the PADDING rule `mode` (cut to `length` if longer). 'crop' returns a
    shorter sequence as it is (crop_to_shortest() cuts the batch)."""
    n = len(sequence)
    if n == 0:
        raise ValueError('cannot pad an empty sequence')
    if n >= length or mode == 'crop':
        return sequence[:length]
    if mode == 'reverse':
        return repeatSequence(sequence, length)
    steps = np.arange(length)
    if mode == 'loop':
        return sequence[steps % n]
    if mode == 'hold':
        return sequence[np.minimum(steps, n - 1)]
    raise ValueError(f'unknown padding {mode!r}; one of {", ".join(PADDING)}')
