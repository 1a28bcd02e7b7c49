"""Data layer shared by every step: UCF-101 split lists, video decoding, frame preprocessing, atomic files.

Training (frameBasedTrain.py) and extraction (saveFeatures_1024.py) both call `preprocess_frame` on the frames
the decoder gives, so the two can never disagree about colour order, mean or resizing.
"""
import argparse
import collections
import contextlib
import errno
import fractions
import glob
import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time

import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and with pip's CUDA)
import numpy as np
from PIL import Image

# Caffe's ImageNet mean, in the BGR order the VGG16 weights were trained with.
MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

CLIP_NAME = re.compile(r'^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)(?P<ext>\.[^./]+)$', re.IGNORECASE)
# Containers a UCF-layout collection may hold (UCF-101 itself is all .avi; re-encoded and downloaded sets are not).
VIDEO_EXTENSIONS = ('.avi', '.mp4', '.m4v', '.mkv', '.webm', '.mov', '.mpg', '.mpeg', '.wmv', '.flv', '.ogv')

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
# Video decoding (PyAV: FFmpeg's libraries in this process)
#
# The frames of a clip are, by definition, what decoding it from its first packet yields, in that order
# (iter_frames). Random access (read_frame) must return exactly those frames. AVI stores no presentation
# timestamps for reordered (B-) frames, so a timestamp seek cannot be trusted there: an AVI clip is decoded from
# its start, converting only the frame asked for (decoding alone runs at ~13,000 frames/s at 320x240). Containers
# that time-stamp every frame (MP4/MOV, Matroska/WebM) are entered at the keyframe before the frame and decoded up
# to the frame whose timestamp is the one sequential decoding shows at that index; anything unexpected falls back
# to decoding from the start.
# ----------------------------------------------------------------------------------------------------------

class VideoError(DataError):
    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason


# Containers whose demuxer gives every video packet its own presentation timestamp.
_TIMESTAMPED_FORMATS = {'mov', 'mp4', 'matroska', 'webm'}

# width, height, fps; stored: the video packets the file holds (what decoding it should yield); frames: the count
# the container claims: `stored`, or the header's count where the file holds less than it promises; truncated:
# the file holds less than its container promises (cut short or broken off); seek: a _SeekIndex, or None where
# random access decodes from the start.
VideoInfo = collections.namedtuple('VideoInfo', 'width height fps frames stored truncated seek')
# pts: presentation timestamps in display order (index i -> pts[i]); key_pts/key_dts: the keyframes, by pts.
_SeekIndex = collections.namedtuple('_SeekIndex', 'pts key_pts key_dts')


def _av_reason(error):
    """The most telling part of a PyAV error: FFmpeg's own last error line (e.g. 'moov atom not found')."""
    text = str(error)
    detail = text.split('last error log:', 1)[1].strip() if 'last error log:' in text else ''
    detail = re.sub(r'^\[[^]]*\]\s*', '', detail)
    return f'{error.strerror}: {detail}' if detail and getattr(error, 'strerror', None) else (
        detail or getattr(error, 'strerror', None) or text)


def _open_failure(path):
    """Why FFmpeg cannot open a file, in its own words: open it again with its error log switched on (FFmpeg's
    log stays off otherwise, so that damaged clips do not flood a job's log)."""
    import av
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as logs:
            try:
                av.open(path).close()
                return 'it opens on a second try'
            except av.error.FFmpegError as e:
                error = e
    finally:
        av.logging.set_level(previous)
    lines = [message.strip() for level, _, message in logs if level <= av.logging.ERROR and message.strip()]
    return f'{error.strerror}: {lines[-1]}' if lines else _av_reason(error)


def _open_video(path):
    import av
    if not os.path.isfile(path):
        raise VideoError(path, 'file not found')
    try:
        container = av.open(path)
    except av.error.FFmpegError:
        raise VideoError(path, f'not a readable video ({_open_failure(path)})') from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, 'holds no video stream')
    stream = container.streams.video[0]
    stream.thread_count = 1  # loaders run one per core already; frame threads only add latency per clip
    return container, stream


def _avi_header(path):
    """(RIFF size says the file is longer than it is, dwTotalFrames of the main header) for an AVI, else None."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if head[:4] != b'RIFF' or head[8:12] != b'AVI ':
        return None
    riff_end = 8 + struct.unpack_from('<I', head, 4)[0]
    at = head.find(b'avih')
    total = struct.unpack_from('<I', head, at + 8 + 16)[0] if 0 < at and len(head) >= at + 8 + 20 else 0
    return os.path.getsize(path) < riff_end, total


def video_info(path):
    """Size, frame rate and frame count of a clip from its container, by reading its packets (no decoding).

    The count is the number of video packets, not duration x fps (which audio longer than the video, or a
    variable frame rate, inflates). A file that holds less than its container promises claims what its header
    promised, so that callers can report it as truncated: an AVI whose RIFF size runs past the end of the file,
    an MP4 whose sample table lists more samples than it holds, a container that breaks off. An AVI header's own
    frame count is not evidence: muxers count B-frame delay and N-VOPs they never store (ffmpeg's libxvid
    writer over-states packed clips by 3-5 frames).
    """
    import av
    container, stream = _open_video(path)
    with container:
        pts, keys, count, chunks, demux_error, no_offsets = [], [], 0, 0, None, True
        try:
            for packet in container.demux(stream):
                if packet.dts is None and packet.pts is None:  # the demuxer's end-of-stream marker
                    continue
                chunks += 1
                if packet.size == 0:  # an AVI 'drop frame' chunk: timing only
                    continue
                if packet.is_discard:  # before an MP4 edit list's start: decoded, never shown
                    continue
                count += 1
                pts.append(packet.pts)
                no_offsets = no_offsets and packet.pts == packet.dts
                if packet.is_keyframe:
                    keys.append((packet.pts, packet.dts))
        except av.error.FFmpegError as e:
            demux_error = _av_reason(e)
        context = stream.codec_context
        if not context.width or not context.height:
            raise VideoError(path, 'not a readable video (no frame size in its header)')
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        avi = _avi_header(path)
        declared = stream.frames or (avi[1] if avi else 0)
        truncated = bool(demux_error) or (avi[0] if avi else declared > chunks)
        frames = max(count, declared) if truncated else count
        seek = None
        if (_TIMESTAMPED_FORMATS & set(container.format.name.split(',')) and keys and None not in pts
                and len(set(pts)) == len(pts)):
            keys = sorted(keys)
            seek = _SeekIndex(np.sort(np.array(pts, np.int64)), np.array([k[0] for k in keys], np.int64),
                              [k[1] for k in keys])
            if no_offsets and not _frames_come_in_timestamp_order(path):
                seek = None  # a reordering decoder behind timestamps that do not say so: decode from the start
        return VideoInfo(context.width, context.height, float(rate) if rate else 25.0, frames, count, truncated,
                         seek)


def _frames_come_in_timestamp_order(path, frames=60):
    """Whether the decoder's first `frames` frames come out with increasing timestamps. Checked where every
    packet's presentation time equals its decoding time: right for a stream without B-frames, but a stream copy
    of one with B-frames (muxed without composition offsets) also looks so, and there a frame's timestamp is
    its decoding position, not its place in the sequence (entering at a keyframe then gave a wrong frame for
    18 of 48 indices of such an H.264 MP4)."""
    container, stream = _open_video(path)
    with container:
        last = None
        for n, frame in enumerate(_decode(container, stream)):
            if frame.pts is None or (last is not None and frame.pts <= last):
                return False
            last = frame.pts
            if n + 1 >= frames:
                break
    return True


def header_frame_count(path):
    """Frame count from an AVI's main header (microseconds, no decoding); other containers are probed.

    Used to balance extraction shards by frames, so it must be cheap for 13,320 clips.
    """
    try:
        avi = _avi_header(path)
    except OSError:
        return 0
    if avi and avi[1]:
        return avi[1]
    try:
        return video_info(path).frames
    except VideoError:
        return 0


def _decode(container, stream):
    """Every frame the decoder yields from the current position, as FFmpeg's command line yields them: a packet
    that does not decode is passed over (the decoder conceals what it can), a container that breaks off ends
    the clip with what decoded so far."""
    import av
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError:
            break
        if packet.size == 0:
            continue
        try:
            yield from stream.decode(packet)
        except av.error.FFmpegError:
            continue
    try:
        yield from stream.decode(None)
    except av.error.FFmpegError:
        pass


# The filter of the command line's scaler (ffmpeg's default -sws_flags). It decides nothing at even sizes, where
# yuv420p -> rgb24 has an unscaled converter; at odd ones the chroma planes are resampled, and PyAV's default
# (bilinear) differed from the command line in 16-19% of the values, by up to 55 levels.
CLI_INTERPOLATION = 'BICUBIC'


def _rgb_frame(frame):
    """The decoder's frame as an rgb24 av.VideoFrame, bit for bit as FFmpeg's command line converts it. At an
    odd width or height the chroma planes are resampled, and the command line's scale filter also reads where
    the frame's chroma samples sit (MPEG-4 part 2 puts them left, others centre), which PyAV's reformatter
    does not: such frames go through a one-filter graph, as on the command line (tests/test_video.py)."""
    if frame.format.name == 'rgb24':
        return frame
    if frame.width % 2 or frame.height % 2:
        graph = _odd_size_graph(frame)
        graph.push(frame)
        return graph.pull()
    return _scaler('convert').reformat(frame, format='rgb24', interpolation=CLI_INTERPOLATION, threads=1)


def _odd_size_graph(frame):
    """This process's and thread's scale + format graph for frames of this size and pixel format (one thread,
    like _scaler, so that a forked loader process inherits no worker threads)."""
    import av.filter
    key = ('graph', frame.width, frame.height, frame.format.name)
    graphs = _scaler_cache()
    if key not in graphs:
        graph = av.filter.Graph()
        graph.threads = 1
        chain = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                  time_base=frame.time_base or fractions.Fraction(1, 25)),
                 graph.add('scale', 'flags=bicubic:threads=1'), graph.add('format', 'rgb24'), graph.add('buffersink')]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        graphs[key] = graph
    return graphs[key]


def _rgb(frame):
    return _rgb_frame(frame).to_ndarray()


def iter_video_frames(path):
    """Decode a clip from its start: every frame the decoder yields, in order, as the decoder gives it (an
    av.VideoFrame in the stream's pixel format, for preprocess_frame; it outlives the file's handle).

    A truncated or damaged file yields fewer frames than video_info().frames; callers compare where that
    matters.
    """
    container, stream = _open_video(path)
    with container:
        yield from _decode(container, stream)


def iter_frames(path):
    """iter_video_frames as HxWx3 uint8 RGB arrays (bit for bit what FFmpeg's command line writes as rgb24)."""
    for frame in iter_video_frames(path):
        yield _rgb(frame)


def read_video_frames(path):
    """All decodable frames of a clip (av.VideoFrame); VideoError if none decode."""
    frames = list(iter_video_frames(path))
    if not frames:
        raise VideoError(path, 'no frame could be decoded')
    return frames


def read_frames(path):
    """All decodable frames of a clip as an (N, H, W, 3) uint8 RGB array; VideoError if none decode."""
    return np.stack([_rgb(frame) for frame in read_video_frames(path)])


def frame_bytes(frame):
    """Memory held by a decoded frame."""
    return sum(plane.buffer_size for plane in frame.planes)


def _seek_frame(container, stream, seek, index):
    """Frame `index` by entering at the keyframe before it, or None where that cannot be done exactly."""
    target = seek.pts[index]
    k = int(np.searchsorted(seek.key_pts, target, side='right')) - 1
    if k < 0:
        return None
    entry = seek.key_dts[k] if seek.key_dts[k] is not None else int(seek.key_pts[k])
    container.seek(int(entry), stream=stream, backward=True, any_frame=False)
    for frame in _decode(container, stream):
        if frame.pts is None or frame.pts > target:
            return None  # entered after the frame, or the decoder dropped it: not what sequential decoding shows
        if frame.pts == target:
            return frame
    return None


def read_video_frame(path, index, info=None):
    """Frame `index` of a clip as the decoder gives it, bit-identical to iter_video_frames(path)'s frame `index`.

    The clip is probed once (pass `info` to skip that). An index past the last decodable frame (a header that
    over-states the length) returns the clip's last decodable frame.
    """
    info = info or video_info(path)
    if info.seek is not None and 0 <= index < len(info.seek.pts):
        container, stream = _open_video(path)
        with container:
            frame = _seek_frame(container, stream, info.seek, index)
            if frame is not None:
                return frame
    container, stream = _open_video(path)
    with container:
        last = None
        for n, frame in enumerate(_decode(container, stream)):
            last = frame
            if n == index:
                break
        if last is None:
            raise VideoError(path, 'no frame could be decoded')
        return last


def read_frame(path, index, info=None):
    """read_video_frame as an HxWx3 uint8 RGB array, bit-identical to iter_frames(path)'s frame `index`."""
    return _rgb(read_video_frame(path, index, info))


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


def preprocess_frame(frame, size, augmentation=NO_AUGMENTATION, out=None):
    """A frame -> 3 x size x size float32, BGR minus the Caffe mean, as VGG16 expects (into `out` if given).

    `frame` is what the decoder gives (iter_video_frames, read_video_frame: an av.VideoFrame in the stream's
    pixel format) or an HxWx3 uint8 RGB array: the result is the same, bit for bit (tested). The frame becomes
    RGB at its own size exactly as FFmpeg's command line converts it (iter_frames); rotation and crop (training's
    optional augmentations) are done there with Pillow; FFmpeg's scaler resizes it with its bilinear filter into
    planes (G, B, R); a flip reverses the columns; the mean is subtracted on the way into the result.

    preprocess_frame v1 resized with Pillow's bilinear filter instead. Both filters are triangles that widen with
    the reduction; their rounding differs: from UCF-101's 320x240 to 224x224 by at most two grey levels, at about
    one value in six, 0.17 on average (tests/test_video.py, bench.py); at reductions of 2x and more, by a few
    levels near sharp edges. This is 2-3x faster than v1 (bench.py); training and extraction share it, so they still agree.
    """
    import av
    if isinstance(frame, np.ndarray):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')
    elif frame.format.name != 'rgb24':
        # exactly _rgb(frame) (FFmpeg's planar GBR output differs in the last columns of frames whose width is
        # not a multiple of 16)
        frame = _rgb_frame(frame)
    if augmentation.angle or augmentation.crop is not None:
        image = frame.to_image()
        if augmentation.angle:
            image = image.rotate(augmentation.angle, resample=Image.BILINEAR)
        if augmentation.crop is not None:
            image = image.crop(augmentation.crop)
        frame = av.VideoFrame.from_image(image)
    scaled = _scaler('resize').reformat(frame, size, size, format='gbrp', interpolation='BILINEAR', threads=1)
    if out is None:
        out = np.empty((3, size, size), np.float32)
    for channel, plane in enumerate(scaled.planes[i] for i in GBRP_PLANE_OF_BGR):
        pixels = np.frombuffer(plane, np.uint8).reshape(size, plane.line_size)[:, :size]
        if augmentation.flip:
            pixels = pixels[:, ::-1]
        np.subtract(pixels, MEAN_BGR[channel], out=out[channel], dtype=np.float32)
    return out


# gbrp holds the planes G, B, R: where B, G and R are
GBRP_PLANE_OF_BGR = (1, 0, 2)
_SCALERS = threading.local()


def _scaler(role):
    """This process's and thread's FFmpeg scaler for `role` (each keeps its context between frames of one size and
    format). One thread each: the parallelism is across frames (decoder threads, loader processes), and a scaler
    with worker threads, inherited by a forked loader process, would wait for them there forever."""
    from av.video.reformatter import VideoReformatter
    scalers = _scaler_cache()
    if role not in scalers:
        scalers[role] = VideoReformatter()
    return scalers[role]


def _scaler_cache():
    """This thread's scalers and graphs, emptied in a forked child (it must make its own)."""
    scalers = _SCALERS.__dict__
    if scalers.get('pid') != os.getpid():
        scalers.clear()
        scalers['pid'] = os.getpid()
    return scalers


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


# ----------------------------------------------------------------------------------------------------------
# Provenance: every output records what made it (a JSON record; downstream records nest their inputs' records)
# ----------------------------------------------------------------------------------------------------------

# What preprocess_frame does; part of an extraction's identity, so change it when preprocessing changes.
PREPROCESSING = ('rgb (FFmpeg via PyAV) -> FFmpeg scaler bilinear resize -> BGR minus Caffe mean '
                 '(preprocess_frame v2)')
_CODE = []


def code_version():
    """The code that ran: a digest of this folder's .py files, and its git commit where it is a checkout."""
    if not _CODE:
        import hashlib
        folder = os.path.dirname(os.path.abspath(__file__))
        digest = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(folder, '*.py'))):
            digest.update(os.path.basename(path).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
        commit = ''
        if os.path.isdir(os.path.join(folder, '.git')):
            try:
                commit = subprocess.run(['git', '-C', folder, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):  # no git on this node: the digest says it all
                pass
        _CODE.append(f'py:{digest.hexdigest()[:12]}' + (f' git:{commit}' if commit else ''))
    return _CODE[0]


def array_digest(arrays):
    """A digest of named arrays (a model's weights): computed once when a file is written, then read from it."""
    import hashlib
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f'{name}:{array.dtype.str}:{array.shape}'.encode())
        digest.update(memoryview(array).cast('B'))
    return digest.hexdigest()[:16]


def make_provenance(step, **fields):
    """What made an output: the step, the code, and the step's inputs and settings (no time stamp: the same
    inputs and code give the same record, so a rerun rewrites identical files)."""
    return dict(step=step, code=code_version(), **fields)


def provenance_text(record):
    import json
    return json.dumps(record, sort_keys=True)


def parse_provenance(text):
    """A provenance record from its stored text; files written before records existed give {'source': text}."""
    import json
    text = '' if text is None else str(text)
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {'source': text or 'unknown'}


def extraction_of(record):
    """The extraction record a downstream record descends from (None if it has none)."""
    if not isinstance(record, dict):
        return None
    if record.get('step') == 'saveFeatures_1024.py':
        return record
    for value in record.values():
        found = extraction_of(value)
        if found:
            return found
    return None


def same_extraction(first, second, first_path, second_path, advice):
    """The extraction records two inputs descend from; DataError when both are recorded and differ (another model,
    split or preprocessing), which would make using them together meaningless."""
    a, b = extraction_of(first), extraction_of(second)
    if a and b and a.get('tag') != b.get('tag'):
        raise DataError(f'{first_path} comes from {describe_extraction(a)} but {second_path} from '
                        f'{describe_extraction(b)}; {advice}')
    return a, b


def feature_size_mismatch(first, first_dim, second, second_dim):
    """The refusal for two feature files of different widths, with what to do about it."""
    return (f'{first} holds {first_dim}-d features but {second} {second_dim}-d: they come from models with '
            'different fc7 sizes (frameBasedTrain.py --feature-size). Extract both subsets with one model '
            '(saveFeatures.sh), pack them together (save_hdf5.py) and normalise them together (normalizeData.py)')


def describe_extraction(record):
    if not record:
        return 'no recorded extraction (written before provenance was recorded)'
    model = record.get('model', {})
    trained_on = model.get('split')
    return (f'extraction {record.get("tag")} (model {model.get("path", "?")} digest {model.get("digest", "?")}, '
            f'fine-tuned on {"an unrecorded split" if trained_on is None else f"split {trained_on}"}; features of '
            f'split {record.get("split")})')


class ExtractionManifest:
    """Which extraction wrote each clip's feature and prediction files.

    `<features dir>/.extractions/<tag>.json` holds an extraction's record; each job appends one line per finished
    clip to its own `<tag>.<host>.<pid>.tsv`, with the size, modification time and content digest of both files
    (the digest of the bytes as they were written). A line counts while both files still have that size and
    time: a stat per file, no reading. A file whose time changed but whose size did not (copied with `cp -r`, or
    moved between file systems without keeping times) is read once and counts if its content has the recorded
    digest; a line with the new time is then added, so the next check is a stat again. Anything rewritten by
    another run (or half-way through a kill) is never taken for this extraction's.
    """

    KINDS = ('features', 'predictions')  # the two files of a clip, in the order of paths() and of a line's stamps

    def __init__(self, features_dir, predictions_dir):
        self.features_dir, self.predictions_dir = features_dir, predictions_dir
        self.folder = os.path.join(features_dir, '.extractions')
        self._entries, self._log, self._tag = None, None, None

    def paths(self, clip_path):
        stem = clip_stem(clip_path) + '.npy'
        return os.path.join(self.features_dir, stem), os.path.join(self.predictions_dir, stem)

    def _stamps(self, clip_path):
        """[(size, modification time) of the feature file, of the prediction file], None for a missing one."""
        stamps = []
        for path in self.paths(clip_path):
            try:
                s = os.stat(path)
                stamps.append((str(s.st_size), str(s.st_mtime_ns)))
            except OSError:
                stamps.append(None)
        return stamps

    def records(self):
        """{tag: extraction record} of every extraction that wrote into these folders."""
        import json
        found = {}
        for path in glob.glob(os.path.join(self.folder, '*.json')):
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    found[os.path.basename(path)[:-5]] = json.load(f)
        return found

    def entries(self):
        """{clip path: {tag: [(size, time, digest) per kind]}} from every job's lines; a line cut short by a kill
        is ignored, and lines written before digests were recorded have digest ''."""
        if self._entries is None:
            self._entries = {}
            for path in glob.glob(os.path.join(self.folder, '*.tsv')):
                tag = os.path.basename(path).split('.', 1)[0]
                with open(path, errors='replace') as f:
                    for line in f:
                        parts = line.rstrip('\n').split('\t')
                        if not line.endswith('\n') or len(parts) not in (5, 7):
                            continue
                        width = (len(parts) - 1) // 2
                        kinds = [tuple(parts[1 + width * i:1 + width * (i + 1)]) for i in range(2)]
                        self._entries.setdefault(parts[0], {})[tag] = [(*k, '')[:3] for k in kinds]
        return self._entries

    def _match(self, clip_path, recorded, kinds):
        """'same' when the files of these kinds are the recorded ones by size and time, 'copied' when only their
        content digest says so, else why not ('rewritten', 'missing', 'undated copy')."""
        current, paths, verdict = self._stamps(clip_path), self.paths(clip_path), 'same'
        for i, kind in enumerate(self.KINDS):
            if kind not in kinds:
                continue
            size, stamp, digest = recorded[i]
            if current[i] is None:
                return 'missing'
            if current[i] == (size, stamp):
                continue
            if current[i][0] != size:
                return 'rewritten'
            if not digest:
                return 'undated copy'
            if file_digest(paths[i]) != digest:
                return 'rewritten'
            verdict = 'copied'
        return verdict

    def tag_of(self, clip_path, kinds=KINDS):
        """The extraction whose files (of these kinds) are in place for this clip now, or None."""
        for tag, recorded in self.entries().get(clip_path, {}).items():
            verdict = self._match(clip_path, recorded, kinds)
            if verdict == 'copied':
                self._restamp(clip_path, tag, recorded)
            if verdict in ('same', 'copied'):
                return tag
        return None

    def why_not(self, clip_path, kinds=KINDS):
        """Why no extraction accounts for this clip's files (for a clip tag_of() gave None)."""
        verdicts = {self._match(clip_path, recorded, kinds)
                    for recorded in self.entries().get(clip_path, {}).values()}
        if not verdicts:
            return 'no record of the extraction that wrote them (an older version of this code, or by hand)'
        if 'undated copy' in verdicts:
            return ('their modification times differ from the recorded ones while their sizes match (copied '
                    'without keeping times?), and their record predates content digests, so the copy cannot be '
                    'checked: copy them again with `cp -p`/`rsync -a` from the original, or re-extract them')
        return 'changed since the extraction that wrote them recorded them (rewritten by another run or by hand)'

    def _restamp(self, clip_path, tag, recorded):
        """Add a line with the copied files' new times (same sizes, same digests), so that the next check is a
        stat again. Best effort: on a read-only copy the digests are simply checked again next time."""
        current = self._stamps(clip_path)
        fields = [clip_path]
        for now, (size, stamp, digest) in zip(current, recorded):
            fields += [*(now or (size, stamp)), digest]
        with contextlib.suppress(OSError):
            with open(os.path.join(self.folder, f'{tag}.{_host()}.{os.getpid()}.tsv'), 'a') as f:
                f.write('\t'.join(fields) + '\n')
        self.entries()[clip_path][tag] = [tuple(fields[1 + 3 * i:4 + 3 * i]) for i in range(2)]

    def start(self, record):
        """Record this extraction (its tag names the record) before writing any clip."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'{record["tag"]}.json')
        if not os.path.isfile(path):
            with atomic_path(path) as tmp, open(tmp, 'w') as f:
                f.write(provenance_text(record))
        self._log = os.path.join(self.folder, f'{record["tag"]}.{_host()}.{os.getpid()}.tsv')
        self._tag = record['tag']

    def add(self, clip_path, digests):
        """Note that this clip's two files, just renamed into place, are this extraction's; `digests` are those
        of their bytes (features, predictions) as save_npy_atomic wrote them."""
        fields = [clip_path]
        for stamp, digest in zip(self._stamps(clip_path), digests):
            fields += [*stamp, digest]
        with open(self._log, 'a') as f:  # one short write in append mode: whole lines even with other writers
            f.write('\t'.join(fields) + '\n')
        if self._entries is not None:
            self._entries.setdefault(clip_path, {})[self._tag] = [tuple(fields[1 + 3 * i:4 + 3 * i])
                                                                  for i in range(2)]


def bytes_digest(data):
    """A content digest for files the pipeline writes and checks later (blake2b, 128 bits; ~1 GB/s)."""
    import hashlib
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path):
    import hashlib
    digest = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _host():
    import socket
    return re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:40] or 'host'


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes, progress
# ----------------------------------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on `path` (created if needed) for the duration, or stop with a DataError naming the
    job that holds it (host, pid and start, written into the file by the holder). `what` says what is locked.
    On a file system that refuses locks (some Lustre mounts), warns and goes on unlocked."""
    import fcntl
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            raise DataError(f'{what} is being done right now by {holder} (it holds {path}): two jobs on it at once '
                            'would overwrite each other\'s files. Wait for it to finish (then rerun this one: it '
                            'skips what is done), or stop it first') from None
        except OSError as e:
            warn(f'cannot lock {path} ({e.strerror}): make sure that only one job does {what} at a time')
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()} on {_host()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        f.flush()
        yield


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
        raise DataError(f'{path}: needs about {human_bytes(needed)} but {probe} has {human_bytes(free)} free; '
                        'free some space or write elsewhere')
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise DataError(f'{path}: needs about {human_bytes(needed)} but files are limited to {human_bytes(limit)} '
                        '(ulimit -f); raise the limit or write elsewhere')


def human_bytes(n):
    """1234567 -> '1.2 MB' (decimal units, three significant digits at most)."""
    for unit in ('bytes', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB'):
        if abs(n) < 999.5 or unit == 'EB':
            return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.3g} {unit}'
        n /= 1000
    return f'{n:.3g} EB'


def available_memory(device_spec='-1'):
    """(bytes this job can still allocate, where): the GPU's free memory for a CUDA --device; otherwise the
    machine's available memory, lowered to what a batch job's cgroup limit (Slurm's --mem) leaves."""
    spec = str(device_spec)
    if spec.lstrip('-').isdigit() and int(spec) >= 0 or spec.startswith('@cupy'):
        device = device_from_arg(spec)
        import cupy
        with cupy.cuda.Device(device.device.id):
            free, total = cupy.cuda.runtime.memGetInfo()
        return free + cupy.get_default_memory_pool().free_bytes(), f'GPU {device.device.id}'
    free = None
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/meminfo') as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    if free is None:
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    where = 'this machine'
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/self/cgroup') as f:
            group = next(line.strip().split(':', 2)[2] for line in f if line.startswith('0::'))
        folder = os.path.join('/sys/fs/cgroup', group.lstrip('/'))
        with open(os.path.join(folder, 'memory.max')) as f:
            limit = f.read().strip()
        if limit != 'max':
            with open(os.path.join(folder, 'memory.current')) as f:
                left = int(limit) - int(f.read())
            if left < free:
                free, where = left, "this job's memory limit"
    return max(free, 0), where


def check_memory(parts, device_spec, advice):
    """Refuse settings that cannot fit before allocating anything (they ended in a MemoryError traceback, or
    swapped the node to a halt). parts: {what: bytes}, a lower bound of what the run holds at once."""
    need = sum(parts.values())
    free, where = available_memory(device_spec)
    if need > free:
        detail = ', '.join(f'{what} {human_bytes(n)}' for what, n in sorted(parts.items(), key=lambda p: -p[1]))
        raise DataError(f'these settings need at least {human_bytes(need)} of memory ({detail}) but {where} has '
                        f'{human_bytes(free)} available; {advice}')


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
    """np.save, atomically; returns the digest of the bytes written (bytes_digest). The bytes go through Python's
    own write: numpy's tofile() ignores a short write on a full disk and would leave a truncated file that looks
    complete."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())
    return bytes_digest(buffer.getbuffer())


@contextlib.contextmanager
def exit_on_user_error():
    """Bad input, and output that cannot be written (full disk, quota, read-only or wrong folder), end the
    script with one line `error: ...` and exit status 1 instead of a traceback. Files are written atomically,
    so nothing incomplete is left under a final name. Ctrl-C ends it with one line too, and exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        # What Ctrl-C cut short (a half-read .npz, say) may complain from its destructor at exit: noise now.
        sys.unraisablehook = lambda unraisable: None
        print(f'\ninterrupted: {os.path.basename(sys.argv[0]) or "the step"} stopped (Ctrl-C); every file under its '
              'final name is whole. Run the same command again to continue (training: add --resume auto to '
              'continue from the last snapshot)', file=sys.stderr, flush=True)
        sys.exit(130)
    except DataError as e:
        sys.exit(f'error: {e}')
    except MemoryError as e:  # CuPy's OutOfMemoryError is one too; the estimates before the work are lower bounds
        sys.exit(f'error: out of memory ({str(e).strip()[:200] or "the machine has no more"}): lower the batch '
                 'size (--batchsize) or the model\'s size, or ask the scheduler for more memory; files already '
                 'written are whole, and a rerun resumes')
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not e.filename:
            raise
        what = e.filename or 'output'
        sys.exit(f'error: {what}: {e.strerror or e} (errno {e.errno}). Check the path, free some space or choose '
                 'another output folder, then rerun; no incomplete file was kept under a final name.')


class PlainLines:
    """Standard output for Chainer's PrintReport: its terminal control (ESC[J, erase to the end of the screen,
    before each line) only where the output is a terminal; a batch job's log file gets plain lines."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, text):
        if not self.stream.isatty():
            text = text.replace('\033[J', '')
        if text:
            self.stream.write(text)

    def flush(self):
        self.stream.flush()


def best_time(function, sync, repeat):
    """Best wall time of `repeat` calls after a warm-up, each waited for (`sync`: the device's synchronisation)."""
    function()
    sync()
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def check_writable(outputs):
    """DataError naming the flag of the first output that cannot be written (a read-only file system, a folder
    without permission, a file in the way), before any work starts. `outputs`: {flag: (path, is_folder)}.
    Writes a probe file where the output would go, or into the nearest existing folder above it; creates
    nothing that stays."""
    for flag, (path, is_folder) in outputs.items():
        folder = os.path.abspath(path if is_folder else os.path.dirname(os.path.abspath(path)))
        existing = folder
        while not os.path.isdir(existing):
            if os.path.exists(existing):
                raise DataError(f'{flag} {path}: {existing} is a file, not a folder: choose another {flag}')
            existing = os.path.dirname(existing)
        try:
            fd, probe = tempfile.mkstemp(prefix='.write_probe_', dir=existing)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            example = os.path.basename(path.rstrip('/')) or 'out'
            raise DataError(f'{flag} {path}: cannot write in {existing} ({e.strerror}); choose a folder you can write '
                            f'to (scratch), e.g. {flag} $SCRATCH/{example}') from None


def refuse_overwriting_inputs(inputs, outputs):
    """DataError naming the flags if an output path is an input (or one output is another): no step may write over
    what it reads. `inputs`, `outputs`: {flag: path}."""
    def same(a, b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # one of them does not exist (yet): compare where they would be
            return os.path.realpath(a) == os.path.realpath(b)
    named = list(outputs.items())
    for i, (out_flag, out_path) in enumerate(named):
        for in_flag, in_path in list(inputs.items()) + named[:i]:
            if same(out_path, in_path):
                raise DataError(f'{out_flag} {out_path} is also {in_flag}: writing it would destroy '
                                f'{"an input" if (in_flag, in_path) in inputs.items() else "another output"} of '
                                f'this step. Give {out_flag} another path')


def usable_cpus():
    """The CPUs this process may run on: a Slurm/PBS cpuset or taskset, not the whole node (os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def _number(kind, test, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            try:  # 1e6 is a whole number too; 2.5 is not one
                number = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
            if kind is not int or not number.is_integer():
                raise argparse.ArgumentTypeError(f'{text} is not {requirement}') from None
            value = int(number)
        if not test(value):
            raise argparse.ArgumentTypeError(f'{text} is not {requirement}')
        return value
    parse.__name__ = kind.__name__
    return parse


# argparse types that refuse nonsense at parse time (exit 2 with the flag named), not hours into a job
positive_int = _number(int, lambda v: v >= 1, 'a positive whole number')
nonnegative_int = _number(int, lambda v: v >= 0, 'zero or more')
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), 'a positive number')
nonnegative_float = _number(float, lambda v: v >= 0 and np.isfinite(v), 'zero or more')
fraction = _number(float, lambda v: 0 <= v < 1, 'in [0, 1)')


# ----------------------------------------------------------------------------------------------------------
# Command lines: the knobs several scripts share, each defined once
# ----------------------------------------------------------------------------------------------------------

DEFAULT_DEVICE = '-1'
SPLITS = (1, 2, 3)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as a configuration sheet: the docstring as written, and every flag with its default."""


def add_data_flags(group, data=True):
    """--data (the clips; not for steps that read only features), --lists and --split, UCF-101's names."""
    if data:
        group.add_argument('--data', default='UCF-101', help='folder with the 101 class folders of clips')
    group.add_argument('--lists', default='ucfTrainTestlist', help='folder with classInd.txt and the split lists')
    group.add_argument('--split', type=int, default=1, choices=SPLITS, help='official split')


def add_device_flag(group):
    group.add_argument('--device', '-d', default=DEFAULT_DEVICE,
                       help='-1 or @numpy: the CPU; 0 or @cupy:0: the first GPU')


def add_conv_flag(group):
    group.add_argument('--conv', default='fast', choices=('stock', 'fast'),
                       help="fast: fast_conv.py's CPU convolution and pooling (about 2x stock on VGG16; GPU arrays "
                            "use Chainer's own either way); stock: Chainer's own")


def add_resume_flag(group):
    group.add_argument('--resume', '-r', default=None,
                       help="snapshot to continue from, or 'auto' for the newest in --out")


def split_at_dashes(argv):
    """(the arguments before `--`, those after it): what a script takes, and what it passes on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--' not in argv:
        return argv, []
    return argv[:argv.index('--')], argv[argv.index('--') + 1:]


def use_device(model, spec):
    """Move the model to the --device and make that device current; returns the device."""
    device = device_from_arg(spec)
    model.to_device(device)
    device.use()
    return device


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
    import json

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
        try:
            record = trainer.get_extension(RunRecord.name)
        except ValueError:
            record = None
        if record is not None:  # settings and inputs first: weights of another shape would fail to load obscurely
            try:
                with np.load(path) as f:
                    stored = f[f'extensions/{RunRecord.name}/settings'] if \
                        f'extensions/{RunRecord.name}/settings' in f.files else None
            except (OSError, ValueError) as e:
                raise DataError(f'{path}: not a readable snapshot ({e}); remove it to resume from the one before, or '
                                'start afresh') from None
            if stored is not None:
                record.check(json.loads(str(stored[()])))
        chainer.serializers.load_npz(path, trainer)
        updater = trainer.updater
        print(f'resumed from {path} at epoch {updater.epoch}, iteration {updater.iteration}', file=sys.stderr)
    return path


INPUT_PREFIX = 'input: '  # RunRecord settings that are not flags: what the run's inputs are (e.g. an extraction)


class RunRecord:
    """A trainer extension saved in every snapshot: the run's settings and the state of its random streams.

    On resume the settings are compared (a snapshot of a run with other settings is refused, naming them) and the
    random streams restored, so that a resumed run goes on exactly as the interrupted one would have. `streams`:
    {name: a numpy RandomState, or the numpy.random module itself (Chainer's dropout draws from it)}.
    """
    trigger = (1, 'epoch')
    priority = 0
    name = 'run_record'

    def __init__(self, settings, streams):
        self.settings, self.streams = settings, streams

    def __call__(self, trainer):
        pass  # it only carries state into and out of snapshots

    def check(self, stored):
        """DataError naming every setting (a flag, or an input's identity: INPUT_PREFIX keys) in which the
        snapshot's run differs from this one. A setting the snapshot does not record (older versions) is not
        compared."""
        differ = sorted(k for k in stored if stored[k] != self.settings.get(k))
        if differ:
            def name(k):
                return k[len(INPUT_PREFIX):] if k.startswith(INPUT_PREFIX) else f'--{k.replace("_", "-")}'
            raise DataError('the snapshot is of a run with other settings: '
                            + ', '.join(f'{name(k)} {stored.get(k)!r} there, {self.settings.get(k)!r} now'
                                        for k in differ)
                            + '. Resume with the same settings and inputs, or start afresh in another --out (or '
                              'without --resume)')

    def initialize(self, trainer):
        pass

    def finalize(self):
        pass

    def on_error(self, trainer, exc, tb):
        pass

    def serialize(self, serializer):
        import json

        import chainer
        if isinstance(serializer, chainer.serializer.Serializer):
            serializer('settings', np.array(json.dumps(self.settings, sort_keys=True)))
            for name, stream in self.streams.items():
                _, keys, position, has_gauss, gauss = stream.get_state()
                serializer(f'{name}_keys', np.asarray(keys))
                serializer(f'{name}_state', np.array([position, has_gauss], np.int64))
                serializer(f'{name}_gauss', np.array(gauss, np.float64))
            return
        try:
            stored = json.loads(str(serializer('settings', None)[()]))
        except KeyError:
            warn('this snapshot records no settings (written by an older version): resuming unchecked, and its '
                 'random streams start afresh')
            return
        self.check(stored)
        for name, stream in self.streams.items():
            keys = serializer(f'{name}_keys', None)
            position, has_gauss = (int(v) for v in serializer(f'{name}_state', None))
            stream.set_state(('MT19937', np.asarray(keys, np.uint32), position, has_gauss,
                              float(serializer(f'{name}_gauss', None))))


# A loss this many times that of guessing uniformly (ln of the classes) has exploded: a softmax loss of 100 ln C
# gives the true class a probability of C^-100, which no run that learns passes through.
EXPLODED = 100


def stop_on_divergence(model, out, n_classes, remedies):
    """A trainer extension that stops the run, before any snapshot or model of NaN is written, when the loss or
    a learning parameter stops being finite, or the loss explodes (EXPLODED times that of guessing among
    `n_classes`); the message says where, at which learning rate, and what to try (`remedies`: this script's
    own flags)."""
    import glob as globbing
    import math

    import chainer
    import chainer.training
    limit = EXPLODED * math.log(max(n_classes, 2))

    @chainer.training.make_extension(trigger=(1, 'iteration'), priority=chainer.training.PRIORITY_WRITER + 1)
    def check(trainer):
        loss = trainer.observation.get('main/loss')
        problem = None
        if loss is not None:
            value = float(chainer.backends.cuda.to_cpu(chainer.as_array(loss)))
            if not np.isfinite(value):
                problem = f'the loss is {value}'
            elif value > limit:
                problem = (f'the loss is {value:.3g}, over {EXPLODED} times that of guessing among {n_classes} '
                           f'classes ({math.log(max(n_classes, 2)):.2f})')
        for name, param in model.namedparams():
            if problem:
                break
            rule = param.update_rule
            if rule is not None and rule.enabled and param.array is not None and \
                    not bool(param.xp.isfinite(param.array).all()):
                problem = f'parameter {name} holds NaN or inf'
        if problem:
            optimizer = trainer.updater.get_optimizer('main')
            lr = getattr(optimizer, 'alpha', None) or optimizer.lr  # Adam: alpha is what --lr sets
            snapshots = globbing.glob(os.path.join(out, 'snapshot_iter_*'))
            kept = (f'the last snapshot, {os.path.join(out, os.path.basename(max(snapshots, key=os.path.getmtime)))}'
                    f', stays' if snapshots else 'no snapshot had been written yet')
            raise DataError(f'training diverged at iteration {trainer.updater.iteration} (epoch '
                            f'{trainer.updater.epoch + 1}): {problem}, learning rate {lr:g}. No model was written; '
                            f'{kept}. Try a learning rate ten times lower (--lr {lr / 10:g}){remedies}.')
    return check


def rate_eta_extension(total_iterations, unit_per_iteration=1, unit='samples', interval=(20, 'iteration'),
                       pauses=None):
    """A Chainer trainer extension printing iterations done, samples/s and the ETA (readable in batch logs).

    pauses(trainer) -> (seconds spent so far outside the iterations, seconds of such work still to come), e.g. the
    test evaluation after each epoch: the rate is then that of training alone and the ETA counts both."""
    import chainer.training

    start = []

    @chainer.training.make_extension(trigger=interval, priority=chainer.training.PRIORITY_READER)
    def report(trainer):
        now, done = time.time(), trainer.updater.iteration
        spent, to_come = pauses(trainer) if pauses else (0.0, 0.0)
        if not start:
            start.extend([now, done, spent])
            return
        rate = (done - start[1]) / max(now - start[0] - (spent - start[2]), 1e-9)
        eta = (total_iterations - done) / rate + to_come if rate > 0 else float('inf')
        print(f'iteration {done}/{total_iterations} ({100 * done / total_iterations:.1f}%): '
              f'{rate * unit_per_iteration:.1f} {unit}/s, ETA {format_seconds(eta)}'
              + (f' (of which {format_seconds(to_come)} evaluation)' if to_come else ''), file=sys.stderr, flush=True)

    return report
