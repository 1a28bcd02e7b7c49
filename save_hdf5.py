"""Part 2: pack the per-clip .npy files of saveFeatures_1024.py into three HDF5 files.

    python save_hdf5.py --split 1

writes train1024.hdf5 and test1024.hdf5 (fc7 features) and testPredictions1024.hdf5 (per-frame softmax).
Each holds one float32 dataset per clip, named by its path without '.avi' ('ApplyEyeMakeup/v_..._g08_c01'),
with the clip's label as an attribute; the file's attributes give the split, the subset, the class names and
the clip order, so later steps need nothing else. Clips are streamed one at a time (memory stays small at
full scale) and each file is written under a temporary name, renamed only when complete.

Every clip of the split must have its files; the missing ones are listed (with the reason from the extraction
failures files, when there is one) and nothing is written, unless --skip-missing. All files must come from one
extraction (one model, this split: saveFeatures_1024.py records which wrote each clip); mixed ones are refused.
Each file's 'provenance' attribute holds the extraction's record (model digest, split, input size,
preprocessing, code version).
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import csv
import glob
import os
import sys

import numpy as np

from helperFunctions import clip_stem, read_class_index, read_split
from ucf.errors import DataError, warn
from ucf.files import check_writable, ensure_space
from ucf.flags import HelpFormatter, add_data_flags
from ucf.packed_hdf5 import write_packed
from ucf.provenance import ExtractionManifest, describe_extraction, make_provenance, provenance_text
from ucf.runcontrol import exit_on_user_error

OUTPUTS = [('train', 'features', 'train1024.hdf5'), ('test', 'features', 'test1024.hdf5'),
           ('test', 'predictions', 'testPredictions1024.hdf5')]


def failure_reasons(log_dir):
    """{clip path: reason} from the extraction shards' failures files."""
    reasons = {}
    for path in sorted(glob.glob(os.path.join(log_dir, 'failures_shard_*.tsv'))):
        with open(path, newline='') as f:
            for row in csv.DictReader(f, delimiter='\t'):
                reasons[row['clip']] = f"{row['status']}: {row['reason']}"
    return reasons


def check_complete(clips, folder, log_dir, skip_missing, what, listed_in='the list'):
    """The clips whose .npy file exists; stop with the list of the others unless skip_missing. `listed_in` says
    which clips these are (the training clips of trainlist01.txt, say), so that a count is never a mystery."""
    present = [c for c in clips if os.path.isfile(os.path.join(folder, clip_stem(c.path) + '.npy'))]
    have = set(present)
    missing = [c for c in clips if c not in have]
    if missing:
        reasons = failure_reasons(log_dir)
        lines = [f'  {c.path}: {reasons.get(c.path, "no file and no failure recorded (shard not run yet?)")}'
                 for c in missing[:20]]
        more = f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''
        message = (f'{len(missing)} of the {len(clips)} clips of {listed_in} have no {what} file in {folder}/:\n'
                   + '\n'.join(lines) + more)
        if not skip_missing:
            unreadable = sum(reasons.get(c.path, '').startswith('skipped') for c in missing)
            advice = []
            if unreadable:
                advice.append(f'{unreadable} of them could not be decoded: a rerun will not change that; replace '
                              'those files (extract them again from UCF101.rar) and rerun their shards.')
            if unreadable < len(missing):
                advice.append(f'{len(missing) - unreadable} have no file yet: rerun the missing shards '
                              '(./saveFeatures.sh; done clips are skipped).')
            raise DataError(message + '\n' + '\n'.join(advice) + '\nOr pass --skip-missing to pack without them.')
        warn(message + '\npacking without them (--skip-missing)')
    return present


def npy_items(clips, folder):
    """(name, label, array) of each clip's .npy file, checked to be a whole frames x dims array."""
    dim = None
    for clip in clips:
        source = os.path.join(folder, clip_stem(clip.path) + '.npy')
        try:
            array = np.load(source)
        except (OSError, ValueError) as e:
            raise DataError(f'{source}: unreadable ({e}); delete it and rerun its shard') from e
        if array.ndim != 2 or array.shape[0] == 0 or (dim is not None and array.shape[1] != dim):
            raise DataError(f'{source}: shape {array.shape}, expected (frames, {dim or "dims"}); '
                            'delete it and rerun its shard')
        dim = array.shape[1]
        yield clip_stem(clip.path), clip.label, array


def one_extraction(plan, features_dir, predictions_dir, split):
    """The record of the one extraction that wrote every file to pack (plan: [(clips, kind)]); DataError when the
    files come from several (another model's features left in place), from none on record, or another split."""
    manifest = ExtractionManifest(features_dir, predictions_dir)
    records, groups = manifest.records(), {}  # {(tag, why no tag): {clip: [kinds]}}
    for clips, kind in plan:
        for clip in clips:
            tag = manifest.tag_of(clip.path, (kind,))
            reason = None if tag else manifest.why_not(clip.path, (kind,))
            groups.setdefault((tag, reason), {}).setdefault(clip.path, []).append(kind)
    untraced = any(tag is None for tag, _ in groups)
    if len(groups) > 1 or untraced:
        def line(key, files):
            n_files = sum(map(len, files.values()))
            counted = f'{len(files)} clips' + (f' ({n_files} files)' if n_files != len(files) else '')
            return f'  {counted} (e.g. {next(iter(files))}): ' + (key[1] or describe_extraction(records.get(key[0])))
        lines = [line(key, files) for key, files in sorted(groups.items(), key=lambda item: -len(item[1]))]
        problem = 'do not all come from one extraction' if len(groups) > 1 else 'cannot be traced to an extraction'
        raise DataError(f'the files in {features_dir}/ and {predictions_dir}/ {problem}:\n' + '\n'.join(lines)
                        + '\nRerun ./saveFeatures.sh with the model you want (it re-extracts every clip that came '
                        'from anything else), then pack again.')
    tag = next(iter(groups), (None, None))[0]
    record = records.get(tag)
    if record is None:
        raise DataError(f'{features_dir}/.extractions/{tag}.json is missing; rerun ./saveFeatures.sh')
    if record.get('split') != split:
        raise DataError(f'the files in {features_dir}/ come from {describe_extraction(record)}, not split {split}; '
                        f'pack with --split {record.get("split")}, or extract split {split}')
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_flags(p, data=False)
    p.add_argument('--features-dir', default='UCF-101_features')
    p.add_argument('--predictions-dir', default='UCF-101_framePrediction')
    p.add_argument('--log-dir', default='extraction_logs', help="saveFeatures_1024.py's failures files")
    p.add_argument('--out-dir', default='.', help='where the three .hdf5 files go')
    p.add_argument('--skip-missing', action='store_true', help='pack the clips that have files, warn of the rest')
    args = p.parse_args(argv)
    with exit_on_user_error():
        check_writable({'--out-dir': (args.out_dir, True)})
        classes = read_class_index(args.lists)
        subsets = {s: read_split(args.lists, args.split, s) for s in ('train', 'test')}
        folders = {'features': args.features_dir, 'predictions': args.predictions_dir}
        listed_in = {s: f'{s}list{args.split:02d}.txt' for s in subsets}
        plan = [(check_complete(subsets[s], folders[k], args.log_dir, args.skip_missing, k, listed_in[s]), s, k,
                 name) for s, k, name in OUTPUTS]  # check all before writing anything
        extraction = one_extraction([(clips, kind) for clips, _, kind, _ in plan], args.features_dir,
                                    args.predictions_dir, args.split)
        record = provenance_text(make_provenance('save_hdf5.py', extraction=extraction))
        for clips, subset, kind, name in plan:
            ensure_space(os.path.join(args.out_dir, name), sum(
                os.path.getsize(os.path.join(folders[kind], clip_stem(c.path) + '.npy')) for c in clips))
            n_clips, n_frames = write_packed(os.path.join(args.out_dir, name), npy_items(clips, folders[kind]),
                                             len(clips), classes, split=args.split, subset=subset, kind=kind,
                                             provenance=record)
            print(f'wrote {os.path.join(args.out_dir, name)}: {n_clips} clips, {n_frames} frames', file=sys.stderr)


if __name__ == '__main__':
    main()
