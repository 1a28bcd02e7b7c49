"""Video decoding (PyAV: FFmpeg's libraries in this process): clip information, exact frame counts, sequential
frames, exact random access, RGB conversion bit for bit like the `ffmpeg` command line, and FFmpeg's scaler.

What leaves this module is the project's own `Frame`: an RGB array with its index in the clip, never a decoder's
object. The frames of a clip are, by definition, what decoding it from its first packet yields, in that order
(iter_frames). Random access (read_frame) must return exactly those frames. AVI stores no presentation
timestamps for reordered (B-) frames, so a timestamp seek cannot be trusted there: an AVI clip is decoded from
its start, converting only the frame asked for (decoding alone runs at ~13,000 frames/s at 320x240). Containers
that time-stamp every frame (MP4/MOV, Matroska/WebM) are entered at the keyframe before the frame and decoded up
to the frame whose timestamp is the one sequential decoding shows at that index; anything unexpected falls back
to decoding from the start.
"""
import collections
import fractions
import os
import re
import struct
import threading

import numpy as np

from ucf.errors import DataError


class Frame(collections.namedtuple('Frame', 'rgb index')):
    """A decoded frame: HxWx3 uint8 RGB, bit for bit what FFmpeg's command line writes as rgb24, and its index (its
    place in sequential decoding)."""
    __slots__ = ()

    @property
    def height(self):
        return self.rgb.shape[0]

    @property
    def width(self):
        return self.rgb.shape[1]


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


def frame_rate(path):
    """The clip's frame rate as its container states it, exactly (a Fraction: 30000/1001, not 29.97)."""
    container, stream = _open_video(path)
    with container:
        return stream.average_rate or stream.guessed_rate or stream.base_rate or fractions.Fraction(25)


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
    """The decoder's frame as an HxWx3 uint8 RGB array (a view of the converted frame's buffer where it can be)."""
    return _rgb_frame(frame).to_ndarray()


def iter_frames(path):
    """Decode a clip from its start: every frame the decoder yields, in order.

    A truncated or damaged file yields fewer frames than video_info().frames; callers compare where that
    matters.
    """
    container, stream = _open_video(path)
    with container:
        for index, frame in enumerate(_decode(container, stream)):
            yield Frame(_rgb(frame), index)


def read_rgb(path):
    """All decodable frames of a clip as a list of HxWx3 uint8 RGB arrays (a stream may change its frame size
    along the clip); VideoError if none decode."""
    frames = [frame.rgb for frame in iter_frames(path)]
    if not frames:
        raise VideoError(path, 'no frame could be decoded')
    return frames


def read_frames(path):
    """All decodable frames of a clip as an (N, H, W, 3) uint8 RGB array; VideoError if none decode, or if the
    frame size changes along the clip (read_rgb takes such clips)."""
    frames = read_rgb(path)
    changed = next((k for k in range(1, len(frames)) if frames[k].shape != frames[0].shape), None)
    if changed is not None:
        raise VideoError(path, f'its frame size changes at frame {changed}, from {frames[0].shape[1]}x'
                               f'{frames[0].shape[0]} to {frames[changed].shape[1]}x{frames[changed].shape[0]}')
    return np.stack(frames)


def _seek_frames(container, stream, seek, index, count):
    """Frames index .. index+count-1 by entering at the keyframe before the first, or None where that cannot be
    done exactly."""
    targets = seek.pts[index:index + count]
    k = int(np.searchsorted(seek.key_pts, targets[0], side='right')) - 1
    if k < 0:
        return None
    entry = seek.key_dts[k] if seek.key_dts[k] is not None else int(seek.key_pts[k])
    container.seek(int(entry), stream=stream, backward=True, any_frame=False)
    found = []
    for frame in _decode(container, stream):
        if frame.pts is not None and frame.pts < targets[0]:
            continue  # decoded on the way from the keyframe
        if frame.pts != targets[len(found)]:
            return None  # entered after the frame, or the decoder dropped one: not what sequential decoding shows
        found.append(frame)
        if len(found) == len(targets):
            return found
    return None


def read_frames_from(path, index, count, info=None):
    """Frames index .. index+count-1 of a clip (fewer where the clip ends first), bit-identical to those of
    iter_frames(path).

    The clip is probed once (pass `info` to skip that). An index past the last decodable frame (a header that
    over-states the length) gives the clip's last decodable frame alone (its own index says which).
    """
    info = info or video_info(path)
    if info.seek is not None and 0 <= index and index + count <= len(info.seek.pts):
        container, stream = _open_video(path)
        with container:
            frames = _seek_frames(container, stream, info.seek, index, count)
            if frames is not None:
                return [Frame(_rgb(frame), index + k) for k, frame in enumerate(frames)]
    container, stream = _open_video(path)
    with container:
        wanted, last = [], None
        for n, frame in enumerate(_decode(container, stream)):
            last = n, frame
            if n >= index:  # only the frames asked for are converted
                wanted.append(Frame(_rgb(frame), n))
                if len(wanted) == count:
                    break
        if last is None:
            raise VideoError(path, 'no frame could be decoded')
        return wanted or [Frame(_rgb(last[1]), last[0])]


def read_frame(path, index, info=None):
    """Frame `index` of a clip, bit-identical to iter_frames(path)'s frame `index` (read_frames_from)."""
    return read_frames_from(path, index, 1, info)[0]


def scaled_bgr(rgb, size):
    """An HxWx3 uint8 RGB array resized to size x size by FFmpeg's scaler with its bilinear filter: three
    size x size uint8 planes, B, G, R. The array is handed to FFmpeg as it is (no copy); the result is the same,
    bit for bit, as scaling the decoder's own RGB frame (tests/test_video.py)."""
    import av
    frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(rgb), format='rgb24')
    scaled = _scaler('resize').reformat(frame, size, size, format='gbrp', interpolation='BILINEAR', threads=1)
    return [np.frombuffer(plane, np.uint8).reshape(size, plane.line_size)[:, :size]
            for plane in (scaled.planes[i] for i in GBRP_PLANE_OF_BGR)]


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
