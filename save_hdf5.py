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
import os
import sys

from helperFunctions import read_class_index, read_split
from ucf.errors import DataError, warn
from ucf.extraction import ExtractionStore, FailureLog, clip_stem
from ucf.files import check_outputs, ensure_space
from ucf.flags import HelpFormatter, add_data_flags, add_output_folder_flags, output_folders
from ucf.packed_hdf5 import write_packed
from ucf.provenance import make_provenance, provenance_text
from ucf.streams import NETWORK_STREAMS, StreamPath, add_stream_flag, apply_stream, stream_path
from ucf.runcontrol import exit_on_user_error

# The packed files: which subset's clips, which output of the extraction, under which name.
PACKED = [('train', 'features', 'train1024.hdf5'), ('test', 'features', 'test1024.hdf5'),
          ('test', 'predictions', 'testPredictions1024.hdf5')]


def check_complete(store, clips, output, log_dir, skip_missing, listed_in='the list'):
    """The clips that have this output's file; stop with the list of the others unless skip_missing. `listed_in`
    says which clips these are (the training clips of trainlist01.txt, say), so that a count is never a mystery."""
    folder = store.folders[output]
    present = [c for c in clips if store.has(c.path, output)]
    have = set(present)
    missing = [c for c in clips if c not in have]
    if not present:  # --skip-missing or not: an empty file would only fail later
        raise DataError(f'none of the {len(clips)} clips of {listed_in} has a {output} file in {folder}/: nothing '
                        'to pack. Check --features-dir/--predictions-dir, or run the extraction (./saveFeatures.sh)')
    if missing:
        reasons = FailureLog.reasons(log_dir)
        lines = [f'  {c.path}: {reasons.get(c.path, "no file and no failure recorded (shard not run yet?)")}'
                 for c in missing[:20]]
        more = f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''
        message = (f'{len(missing)} of the {len(clips)} clips of {listed_in} have no {output} file in {folder}/:\n'
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


def packed_items(store, clips, output):
    """(name, label, array) of each clip's file of this output, each checked to be a whole frames x dims array of
    the first one's width."""
    dim = None
    for clip in clips:
        array = store.read(clip.path, output, dim)
        dim = array.shape[1]
        yield clip_stem(clip.path), clip.label, array


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_stream_flag(p, NETWORK_STREAMS)
    add_data_flags(p, data=False)
    add_output_folder_flags(p)
    p.add_argument('--log-dir', default=StreamPath('extraction_logs'), help="saveFeatures_1024.py's failures files")
    p.add_argument('--out-dir', default='.', help='where the three .hdf5 files go')
    p.add_argument('--skip-missing', action='store_true', help='pack the clips that have files, warn of the rest')
    args = apply_stream(p.parse_args(argv))
    with exit_on_user_error():
        check_outputs(folders={'--out-dir': args.out_dir})
        classes = read_class_index(args.lists)
        subsets = {s: read_split(args.lists, args.split, s) for s in ('train', 'test')}
        store = ExtractionStore(output_folders(args))
        plan = [(check_complete(store, subsets[subset], output, args.log_dir, args.skip_missing,
                                f'{subset}list{args.split:02d}.txt'), subset, output, name)
                for subset, output, name in PACKED]  # check all before writing anything
        extraction = store.one_extraction([(clips, output) for clips, _, output, _ in plan], args.split)
        stream = extraction.get('stream', 'rgb')
        if stream != args.stream:
            raise DataError(f'the files in {args.features_dir}/ come from the {stream} stream\'s extraction, not the '
                            f'{args.stream} stream\'s: pack them with --stream {stream}')
        record = provenance_text(make_provenance('save_hdf5.py', extraction=extraction))
        for clips, subset, output, name in plan:
            path = os.path.join(args.out_dir, stream_path(name, args.stream))
            ensure_space(path, sum(os.path.getsize(store.path(c.path, output)) for c in clips))
            n_clips, n_frames = write_packed(path, packed_items(store, clips, output), len(clips), classes,
                                             split=args.split, subset=subset, kind=output, provenance=record)
            print(f'wrote {path}: {n_clips} clips, {n_frames} frames', file=sys.stderr)


if __name__ == '__main__':
    main()
