"""An extraction's outputs on disk, and the one class that knows their layout (ExtractionStore).

For every clip, one float32 frames x dims .npy file per named output of the network (VGGNet_1024.OUTPUTS: the fc7
features and the softmax predictions; any number of outputs), each output in its own folder:
<folder>/<Class>/<clip>.npy. Beside them, in the first output's folder, `.extractions/` holds the manifest that
says which extraction wrote each clip's files and the shards' locks; the shards' failures files are in their log
folder. saveFeatures_1024.py writes through the store, save_hdf5.py reads through it, and files that another
extraction wrote (another model, split or preprocessing) are never taken for this one's.
"""
import contextlib
import csv
import glob
import os

import numpy as np

from ucf.errors import DataError, warn
from ucf.files import atomic_path, exclusive_lock, file_digest, host_name, save_npy_atomic
from ucf.provenance import describe_extraction, provenance_text

# The outputs of an extraction whose record does not name them (written before records did), in the order of
# their manifest lines' stamps.
LEGACY_OUTPUTS = ('features', 'predictions')


def clip_stem(rel_path):
    """'Class/v_Class_g01_c01.avi' -> 'Class/v_Class_g01_c01': a clip's name in every output folder and in the
    packed HDF5 files."""
    return os.path.splitext(rel_path)[0]


class ExtractionStore:
    """The outputs of extractions in a set of folders, {output name: folder}, and their manifest.

    The manifest: `<first folder>/.extractions/<tag>.json` holds an extraction's record (which names its outputs,
    in order); each job appends one line per finished clip to its own `<tag>.<host>.<pid>.tsv`: the clip, then
    the size, modification time and content digest of each output's file (the digest of the bytes as they were
    written). A line counts while the files still have that size and time: a stat per file, no reading. A file
    whose time changed but whose size did not (copied with `cp -r`, or moved between file systems without
    keeping times) is read once and counts if its content has the recorded digest; a line with the new time is
    then added, so the next check is a stat again. Anything rewritten by another run (or half-way through a
    kill) is never taken for this extraction's.
    """

    def __init__(self, folders):
        self.folders = dict(folders)
        self.outputs = tuple(self.folders)
        self.folder = os.path.join(next(iter(self.folders.values())), '.extractions')
        self._entries, self._records, self._log, self._tag = None, None, None, None

    # ------------------------------------------------------------------------------------------------------
    # The files
    # ------------------------------------------------------------------------------------------------------

    def path(self, clip_path, output):
        return os.path.join(self.folders[output], clip_stem(clip_path) + '.npy')

    def paths(self, clip_path, outputs=None):
        return {output: self.path(clip_path, output) for output in outputs or self.outputs}

    def has(self, clip_path, output):
        return os.path.isfile(self.path(clip_path, output))

    def read(self, clip_path, output, dim=None):
        """One output of one clip: a whole frames x dims array (of `dim` columns where given), or a DataError that
        names the file and says what to do."""
        path = self.path(clip_path, output)
        try:
            array = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f'{path}: unreadable ({e}); delete it and rerun its shard') from e
        if array.ndim != 2 or array.shape[0] == 0 or (dim is not None and array.shape[1] != dim):
            raise DataError(f'{path}: shape {array.shape}, expected (frames, {dim or "dims"}); '
                            'delete it and rerun its shard')
        return array

    def save(self, clip_path, arrays):
        """Write a clip's outputs ({output: frames x dims array}), each atomically as float32, then record them as
        this extraction's (start() first)."""
        digests = {output: save_npy_atomic(self.path(clip_path, output), arrays[output].astype(np.float32))
                   for output in self.outputs}
        stamps = self._stamps(clip_path)
        fields = [clip_path] + [field for output in self.outputs for field in (*stamps[output], digests[output])]
        with open(self._log, 'a') as f:  # one short write in append mode: whole lines even with other writers
            f.write('\t'.join(fields) + '\n')
        if self._entries is not None:
            self._entries.setdefault(clip_path, {})[self._tag] = {
                output: (*stamps[output], digests[output]) for output in self.outputs}

    # ------------------------------------------------------------------------------------------------------
    # Which extraction wrote them
    # ------------------------------------------------------------------------------------------------------

    def start(self, record):
        """Record this extraction (its tag names the record) before writing any clip."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'{record["tag"]}.json')
        if not os.path.isfile(path):
            with atomic_path(path) as tmp, open(tmp, 'w') as f:
                f.write(provenance_text(dict(record, outputs=list(self.outputs))))
            self._records = None  # read again, this one with them
        self._log = os.path.join(self.folder, f'{record["tag"]}.{host_name()}.{os.getpid()}.tsv')
        self._tag = record['tag']

    @contextlib.contextmanager
    def shard(self, shard, num_shards):
        """Hold the lock of one shard of the work: two jobs on one shard would overwrite each other's files between
        writing and recording them, so a second one stops at once, naming the holder."""
        lock = os.path.join(self.folder, f'shard_{shard:02d}_of_{num_shards:02d}.lock')
        with exclusive_lock(lock, f'extraction of shard {shard} of {num_shards}'):
            yield

    def records(self):
        """{tag: extraction record} of every extraction that wrote into these folders (read once)."""
        import json
        if self._records is None:
            self._records = {}
            for path in glob.glob(os.path.join(self.folder, '*.json')):
                with contextlib.suppress(OSError, ValueError):
                    with open(path) as f:
                        self._records[os.path.basename(path)[:-5]] = json.load(f)
        return self._records

    def entries(self):
        """{clip path: {tag: {output: (size, time, digest)}}} from every job's lines; a line cut short by a kill is
        ignored, and lines written before digests were recorded have digest ''."""
        if self._entries is None:
            self._entries, records = {}, self.records()
            for path in glob.glob(os.path.join(self.folder, '*.tsv')):
                tag = os.path.basename(path).split('.', 1)[0]
                outputs = records.get(tag, {}).get('outputs', LEGACY_OUTPUTS)
                with open(path, errors='replace') as f:
                    for line in f:
                        parts = line.rstrip('\n').split('\t')
                        width = (len(parts) - 1) / len(outputs)
                        if not line.endswith('\n') or width not in (2, 3):  # 2: before content digests
                            continue
                        width = int(width)
                        stamps = {output: (*parts[1 + width * i:1 + width * (i + 1)], '')[:3]
                                  for i, output in enumerate(outputs)}
                        self._entries.setdefault(parts[0], {})[tag] = stamps
        return self._entries

    def _stamps(self, clip_path):
        """{output: (size, modification time) of its file, or None where it is missing}."""
        stamps = {}
        for output, path in self.paths(clip_path).items():
            try:
                s = os.stat(path)
                stamps[output] = (str(s.st_size), str(s.st_mtime_ns))
            except OSError:
                stamps[output] = None
        return stamps

    def _match(self, clip_path, recorded, outputs):
        """'same' when the files of these outputs are the recorded ones by size and time, 'copied' when only their
        content digest says so, else why not ('rewritten', 'missing', 'undated copy')."""
        current, verdict = self._stamps(clip_path), 'same'
        for output in outputs:
            if output not in recorded:
                return 'missing'
            size, stamp, digest = recorded[output]
            if current[output] is None:
                return 'missing'
            if current[output] == (size, stamp):
                continue
            if current[output][0] != size:
                return 'rewritten'
            if not digest:
                return 'undated copy'
            if file_digest(self.path(clip_path, output)) != digest:
                return 'rewritten'
            verdict = 'copied'
        return verdict

    def tag_of(self, clip_path, outputs=None):
        """The extraction whose files (of these outputs; all by default) are in place for this clip now, or None."""
        outputs = outputs or self.outputs
        for tag, recorded in self.entries().get(clip_path, {}).items():
            verdict = self._match(clip_path, recorded, outputs)
            if verdict == 'copied':
                self._restamp(clip_path, tag, recorded, outputs)
            if verdict in ('same', 'copied'):
                return tag
        return None

    def why_not(self, clip_path, outputs=None):
        """Why no extraction accounts for this clip's files (for a clip tag_of() gave None)."""
        verdicts = {self._match(clip_path, recorded, outputs or self.outputs)
                    for recorded in self.entries().get(clip_path, {}).values()}
        if not verdicts:
            return 'no record of the extraction that wrote them (an older version of this code, or by hand)'
        if 'undated copy' in verdicts:
            return ('their modification times differ from the recorded ones while their sizes match (copied '
                    'without keeping times?), and their record predates content digests, so the copy cannot be '
                    'checked: copy them again with `cp -p`/`rsync -a` from the original, or re-extract them')
        return 'changed since the extraction that wrote them recorded them (rewritten by another run or by hand)'

    def _restamp(self, clip_path, tag, recorded, outputs):
        """Add a line with the new times of the copied files of these outputs, just checked by digest (an output
        not checked keeps its recorded time, to be checked when asked for), so that the next check is a stat
        again. Best effort: on a read-only copy the digests are simply checked again next time. Written in the
        order of the extraction's own lines."""
        current, order = self._stamps(clip_path), self.records().get(tag, {}).get('outputs', LEGACY_OUTPUTS)
        stamps = {output: (*(current[output] if output in outputs and current[output] else (size, stamp)), digest)
                  for output, (size, stamp, digest) in recorded.items()}
        with contextlib.suppress(OSError):
            with open(os.path.join(self.folder, f'{tag}.{host_name()}.{os.getpid()}.tsv'), 'a') as f:
                f.write('\t'.join([clip_path] + [field for output in order for field in stamps[output]]) + '\n')
        self.entries()[clip_path][tag] = stamps

    def one_extraction(self, plan, split):
        """The record of the one extraction that wrote every file in `plan` ([(clips, output)]); DataError when the
        files come from several (another model's features left in place), from none on record, or another
        split."""
        records, groups = self.records(), {}  # {(tag, why no tag): {clip: [outputs]}}
        for clips, output in plan:
            for clip in clips:
                tag = self.tag_of(clip.path, (output,))
                reason = None if tag else self.why_not(clip.path, (output,))
                groups.setdefault((tag, reason), {}).setdefault(clip.path, []).append(output)
        where = ' and '.join(f'{folder}/' for folder in self.folders.values())
        if len(groups) > 1 or any(tag is None for tag, _ in groups):
            def line(key, files):
                n_files = sum(map(len, files.values()))
                counted = f'{len(files)} clips' + (f' ({n_files} files)' if n_files != len(files) else '')
                return (f'  {counted} (e.g. {next(iter(files))}): '
                        + (key[1] or describe_extraction(records.get(key[0]))))
            lines = [line(key, files) for key, files in sorted(groups.items(), key=lambda item: -len(item[1]))]
            problem = 'do not all come from one extraction' if len(groups) > 1 else 'cannot be traced to an extraction'
            raise DataError(f'the files in {where} {problem}:\n' + '\n'.join(lines)
                            + '\nRerun ./saveFeatures.sh with the model you want (it re-extracts every clip that '
                            'came from anything else), then pack again.')
        tag = next(iter(groups), (None, None))[0]
        record = records.get(tag)
        if record is None:
            raise DataError(f'{self.folder}/{tag}.json is missing; rerun ./saveFeatures.sh')
        if record.get('split') != split:
            raise DataError(f'the files in {where} come from {describe_extraction(record)}, not split {split}; '
                            f'pack with --split {record.get("split")}, or extract split {split}')
        return record


FAILURE_FIELDS = ['clip', 'status', 'frames_read', 'frames_claimed', 'reason']


class FailureLog:
    """A shard's failures file (clips skipped or kept partial, and why), rewritten atomically after each new entry
    so a killed job keeps it."""

    def __init__(self, path):
        self.path, self.rows = path, {}
        if os.path.isfile(path):
            with open(path, newline='') as f:
                self.rows = {row['clip']: row for row in csv.DictReader(f, delimiter='\t')}

    def record(self, clip, status, frames_read, frames_claimed, reason):
        self.rows[clip] = dict(clip=clip, status=status, frames_read=frames_read, frames_claimed=frames_claimed,
                               reason=reason)
        warn(f'{clip}: {reason} ({status})')
        self.save()

    def forget(self, clip):
        if self.rows.pop(clip, None):
            self.save()

    def save(self):
        with atomic_path(self.path) as tmp, open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, FAILURE_FIELDS, delimiter='\t', lineterminator='\n')
            writer.writeheader()
            writer.writerows(sorted(self.rows.values(), key=lambda r: r['clip']))

    @staticmethod
    def reasons(log_dir):
        """{clip path: 'status: reason'} from every shard's failures file in `log_dir`."""
        reasons = {}
        for path in sorted(glob.glob(os.path.join(log_dir, 'failures_shard_*.tsv'))):
            with open(path, newline='') as f:
                for row in csv.DictReader(f, delimiter='\t'):
                    reasons[row['clip']] = f"{row['status']}: {row['reason']}"
        return reasons
