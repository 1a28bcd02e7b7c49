"""Data layer shared by every step: UCF-101 split lists, video decoding, frame preprocessing, atomic files.

Training (frameBasedTrain.py) and extraction (saveFeatures_1024.py) both call `preprocess_frame`, so the two
can never disagree about colour order, mean or resizing.
"""
import collections
import contextlib
import errno
import glob
import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Caffe's ImageNet mean, in the BGR order the VGG16 weights were trained with.
MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

CLIP_NAME = re.compile(r'^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)\.avi$', re.IGNORECASE)

Clip = collections.namedtuple('Clip', 'path label')  # path relative to the data root, 0-based label


class DataError(Exception):
    """Bad input the user can fix; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Split lists
# ----------------------------------------------------------------------------------------------------------

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
        raise DataError(f'{path}:{number}: expected "<Class>/v_<Class>_gGG_cCC.avi", got {rel!r}')
    if folder not in classes:
        raise DataError(f'{path}:{number}: class folder {folder!r} is not in classInd.txt; '
                        'are the lists and classInd.txt from the same release?')
    m = CLIP_NAME.match(name)
    # UCF-101 itself names the files of folder HandstandPushups "v_HandStandPushups_*": compare without case.
    if not m or m.group('cls').lower() != folder.lower():
        raise DataError(f'{path}:{number}: clip name {name!r} does not match its folder {folder!r}')
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
    return clips


def clip_group(rel_path):
    """Group number of a clip (clips of one group come from one long video and never straddle train/test)."""
    return int(CLIP_NAME.match(os.path.basename(rel_path)).group('group'))


def clip_stem(rel_path):
    """'Class/v_Class_g01_c01.avi' -> 'Class/v_Class_g01_c01', the key used for feature files and HDF5."""
    return os.path.splitext(rel_path)[0]


def check_clips_on_disk(data_root, clips, allow_missing=False):
    """Clips whose file exists. Missing ones stop the run with their names unless allow_missing (then warn)."""
    if not os.path.isdir(data_root):
        raise DataError(f'{data_root}: data folder not found. Pass --data the folder that holds the 101 class '
                        'folders of UCF-101 (UCF-101/ApplyEyeMakeup/..., from UCF101.rar).')
    present = [c for c in clips if os.path.isfile(os.path.join(data_root, c.path))]
    missing = len(clips) - len(present)
    if missing:
        names = [c.path for c in clips if not os.path.isfile(os.path.join(data_root, c.path))]
        message = (f'{missing} of {len(clips)} listed clips are missing under {data_root}/, e.g. '
                   f'{", ".join(names[:3])}')
        if not allow_missing:
            raise DataError(message + '. Check --data and --split, or pass --skip-missing to go on without them.')
        warn(message + '; going on without them (--skip-missing).')
    return present


# ----------------------------------------------------------------------------------------------------------
# Video decoding (imageio-ffmpeg's bundled ffmpeg; one process per clip, frames streamed through a pipe)
# ----------------------------------------------------------------------------------------------------------

class VideoError(DataError):
    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason


def _ffmpeg():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


_INFO = re.compile(r'Stream #.*?Video: .*?, (?P<w>\d+)x(?P<h>\d+)')
_FPS = re.compile(r'(?P<fps>[\d.]+) fps')
_TBR = re.compile(r'(?P<fps>[\d.]+)k? tbr')
_DURATION = re.compile(r'Duration: (?P<h>\d+):(?P<m>\d+):(?P<s>[\d.]+)')

VideoInfo = collections.namedtuple('VideoInfo', 'width height fps frames')


def video_info(path):
    """Size, frame rate and the frame count the container claims, read from the header (no decoding)."""
    if not os.path.isfile(path):
        raise VideoError(path, 'file not found')
    proc = subprocess.run([_ffmpeg(), '-hide_banner', '-nostdin', '-i', path], capture_output=True, text=True,
                          errors='replace')
    video = _INFO.search(proc.stderr)
    if not video:
        last = proc.stderr.strip().splitlines()[-1:] or ['no output']
        raise VideoError(path, f'not a readable video ({last[0]})')
    line = proc.stderr[video.start():].splitlines()[0]
    rate = _FPS.search(line) or _TBR.search(line)
    fps = float(rate.group('fps')) if rate else 25.0
    duration = _DURATION.search(proc.stderr)
    seconds = (int(duration.group('h')) * 3600 + int(duration.group('m')) * 60 + float(duration.group('s'))
               if duration else 0.0)
    return VideoInfo(int(video.group('w')), int(video.group('h')), fps, int(round(seconds * fps)))


def header_frame_count(path):
    """Frame count from an AVI's main header (microseconds, no ffmpeg); other containers are probed with ffmpeg.

    Used to balance extraction shards by frames, so it must be cheap for 13,320 clips.
    """
    try:
        with open(path, 'rb') as f:
            head = f.read(4096)
        at = head.find(b'avih')
        if head[:4] == b'RIFF' and head[8:12] == b'AVI ' and at > 0 and len(head) >= at + 8 + 20:
            return struct.unpack_from('<I', head, at + 8 + 16)[0]  # dwTotalFrames, the 5th DWORD of avih
    except OSError:
        return 0
    try:
        return video_info(path).frames
    except VideoError:
        return 0


def iter_frames(path, start=0.0, count=None, info=None):
    """Decode a clip as HxWx3 uint8 RGB frames, from the first frame shown at or after `start` seconds.

    ffmpeg stops at the first undecodable packet, so a truncated file silently yields fewer frames; callers
    compare with video_info().frames where that matters.
    """
    if not os.path.isfile(path):
        raise VideoError(path, 'file not found')
    info = info or video_info(path)
    cmd = [_ffmpeg(), '-hide_banner', '-nostdin', '-loglevel', 'error']
    select = []
    if start > 0:
        # Input seeking jumps to the keyframe before and decodes from there. Its own cut-off rounds timestamps
        # (it picked the previous frame at 29.97 fps), so seek a little early and select on the exact
        # timestamps, which -copyts keeps.
        cmd += ['-ss', f'{max(0.0, start - 2.0 / info.fps):.6f}', '-copyts']
        select = ['-vf', f'select=gte(t\\,{start:.6f})']
    # passthrough: every decoded frame exactly once, never duplicated or dropped to fit a constant rate
    cmd += ['-i', path, '-map', '0:v:0', '-an', *select, '-fps_mode', 'passthrough', '-f', 'rawvideo',
            '-pix_fmt', 'rgb24']
    if count is not None:
        cmd += ['-frames:v', str(count)]
    cmd += ['-']
    size = info.width * info.height * 3
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=size)
    try:
        while True:
            buf = proc.stdout.read(size)
            if len(buf) < size:
                break
            yield np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def read_frames(path):
    """All decodable frames of a clip as an (N, H, W, 3) uint8 array; VideoError if none decode."""
    frames = list(iter_frames(path))
    if not frames:
        raise VideoError(path, 'no frame could be decoded')
    return np.stack(frames)


def read_frame(path, index, info=None):
    """Frame `index` of a clip by seeking, without decoding the clip from its start.

    The clip is probed once (pass `info` to skip that). If the seek lands past the last decodable frame
    (a header that over-states the length), the clip's last decodable frame is returned instead.
    """
    info = info or video_info(path)
    # Half a frame early, so that the rounding of timestamps cannot skip the frame asked for.
    start = (index - 0.5) / info.fps if index > 0 else 0.0
    for frame in iter_frames(path, start=start, count=1, info=info):
        return frame
    frames = read_frames(path)
    return frames[min(index, len(frames) - 1)]


# ----------------------------------------------------------------------------------------------------------
# Frame preprocessing: the one function that training and extraction share
# ----------------------------------------------------------------------------------------------------------

Augmentation = collections.namedtuple('Augmentation', 'flip crop angle')
NO_AUGMENTATION = Augmentation(False, None, 0.0)


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


def preprocess_frame(frame, size, augmentation=NO_AUGMENTATION):
    """HxWx3 uint8 RGB frame -> 3 x size x size float32, BGR minus the Caffe mean, as VGG16 expects."""
    image = Image.fromarray(frame)
    if augmentation.angle:
        image = image.rotate(augmentation.angle, resample=Image.BILINEAR)
    if augmentation.crop is not None:
        image = image.crop(augmentation.crop)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image)
    if augmentation.flip:
        pixels = pixels[:, ::-1]
    # channel by channel, straight from the uint8 pixels into the result: about 4x faster than converting the
    # whole HxWx3 image to float, then reversing, subtracting and transposing it (1.36 against 2.47 ms for the
    # whole function on a 320x240 frame)
    x = np.empty((3,) + pixels.shape[:2], np.float32)
    for channel in range(3):
        np.subtract(pixels[:, :, 2 - channel], MEAN_BGR[channel], out=x[channel], dtype=np.float32)
    return x


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


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes, progress
# ----------------------------------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, remove_stale=False):
    """Yield a temporary name in the same folder; on success it is renamed to `path` in one step.

    A job killed mid-write leaves only a hidden '.tmp' file that no later step reads as complete. With
    remove_stale (for outputs that have one writer at a time), such leftovers of `path` are deleted first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    if remove_stale:
        for name in os.listdir(folder):
            if name.startswith(f'.{base}.') and name.endswith(f'.tmp{ext}'):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=f'.tmp{ext}', dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # name the file the user asked for
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def ensure_space(path, needed_bytes):
    """Refuse to start writing `path` when the disk (or the shell's file-size limit, ulimit -f) cannot take it:
    better one clear line now than a full disk an hour into the job."""
    import resource
    import shutil
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    needed = int(needed_bytes * 1.05) + (1 << 20)
    if needed > free:
        raise DataError(f'{path}: needs about {needed / 1e6:,.0f} MB but {probe} has {free / 1e6:,.0f} MB free; '
                        'free some space or write elsewhere')
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise DataError(f'{path}: needs about {needed / 1e6:,.0f} MB but files are limited to {limit / 1e6:,.1f} MB '
                        '(ulimit -f); raise the limit or write elsewhere')


def run_isolated(function, *args):
    """Run function(*args) in a forked child and return its result.

    HDF5 crashes the whole interpreter (segmentation fault) when a write fails half-way, e.g. on a disk that
    fills up; in a child, that becomes an error the parent can report, and the parent's atomic_path removes
    the temporary file.
    """
    import multiprocessing
    context = multiprocessing.get_context('fork')
    receive, send = context.Pipe(duplex=False)

    def child():
        import faulthandler
        faulthandler.disable()  # a crash here is expected and reported by the parent; no C-level dump
        try:
            send.send(('ok', function(*args)))
        except BaseException as e:  # handed to the parent, which raises it
            send.send(('error', e))

    process = context.Process(target=child)
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = 'crash', None
    process.join()
    if status == 'ok':
        return value
    if status == 'error' and isinstance(value, (DataError, OSError, KeyboardInterrupt)):
        raise value
    reason = (f'{type(value).__name__}: {str(value).strip().splitlines()[0][:100]}' if status == 'error'
              else f'exit {process.exitcode}')
    raise OSError(errno.EIO, f'the writer failed ({reason}); the disk may be full')


def save_npy_atomic(path, array):
    """np.save, atomically. The bytes go through Python's own write: numpy's tofile() ignores a short write on a
    full disk and would leave a truncated file that looks complete."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())


@contextlib.contextmanager
def exit_on_user_error():
    """Bad input, and output that cannot be written (full disk, quota, read-only or wrong folder), end the
    script with one line `error: ...` and exit status 1 instead of a traceback. Files are written atomically,
    so nothing incomplete is left under a final name."""
    try:
        yield
    except DataError as e:
        sys.exit(f'error: {e}')
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not e.filename:
            raise
        what = e.filename or 'output'
        sys.exit(f'error: {what}: {e.strerror or e} (errno {e.errno}). Check the path, free some space or choose '
                 'another output folder, then rerun; no incomplete file was kept under a final name.')


def warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)


class Progress:
    """A one-line progress report with rate and ETA, printed at most every `interval` seconds."""

    def __init__(self, total, unit='items', label='', interval=2.0, stream=sys.stderr):
        self.total, self.unit, self.label, self.interval, self.stream = total, unit, label, interval, stream
        self.done, self.start, self.last = 0, time.time(), 0.0

    def update(self, n=1, extra=''):
        self.done += n
        now = time.time()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float('inf')
            print(f'{self.label}{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%) '
                  f'{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}'
                  f'{" " + extra if extra else ""}', file=self.stream, flush=True)


def format_seconds(seconds):
    if not np.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def device_from_arg(spec):
    """--device value -> chainer device: '-1' or '@numpy' is the CPU, '0' or '@cupy:0' the first GPU."""
    import chainer
    spec = str(spec)
    if spec.lstrip('-').isdigit():
        spec = '@numpy' if int(spec) < 0 else f'@cupy:{int(spec)}'
    try:
        return chainer.get_device(spec)
    except Exception as e:
        raise DataError(f'device {spec!r} is not usable ({e}). For a GPU install CuPy 13 (README, GPU section); '
                        'use --device -1 for the CPU.') from e


def resume_trainer(trainer, out, resume):
    """Load `resume` (a snapshot, or 'auto' for the newest snapshot_iter_* in `out`, if any) into the trainer.
    Returns the snapshot's path, or None when 'auto' finds nothing (a first run)."""
    import chainer
    if not resume:
        return None
    if resume == 'auto':
        snapshots = glob.glob(os.path.join(out, 'snapshot_iter_*'))
        path = max(snapshots, key=lambda p: int(p.rsplit('_', 1)[1]), default=None)
    else:
        path = resume
    if path and not os.path.isfile(path):
        raise DataError(f'{path}: snapshot not found; --resume auto picks the newest in --out')
    if path:
        chainer.serializers.load_npz(path, trainer)
        updater = trainer.updater
        print(f'resumed from {path} at epoch {updater.epoch}, iteration {updater.iteration}', file=sys.stderr)
    return path


def rate_eta_extension(total_iterations, unit_per_iteration=1, unit='samples', interval=(20, 'iteration')):
    """A Chainer trainer extension printing iterations done, samples/s and the ETA (readable in batch logs)."""
    import chainer.training

    start = []

    @chainer.training.make_extension(trigger=interval, priority=chainer.training.PRIORITY_READER)
    def report(trainer):
        now, done = time.time(), trainer.updater.iteration
        if not start:
            start.extend([now, done])
            return
        rate = (done - start[1]) / max(now - start[0], 1e-9)
        eta = (total_iterations - done) / rate if rate > 0 else float('inf')
        print(f'iteration {done}/{total_iterations} ({100 * done / total_iterations:.1f}%): '
              f'{rate * unit_per_iteration:.1f} {unit}/s, ETA {format_seconds(eta)}', file=sys.stderr, flush=True)

    return report
