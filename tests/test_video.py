"""The video layer on the encodings real collections hold: random access equals sequential decoding, frame by
frame, and the frame counts come from the container.

Every clip is made here by the bundled ffmpeg; the reference decode is ffmpeg's own command line.
"""
import os
import re
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from ucf import preprocessing, video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SOURCE = ['-f', 'lavfi', '-i', 'testsrc2=size=96x72:rate=25:duration=2']  # 50 frames, moving content
X264_B = ['-c:v', 'libx264', '-preset', 'ultrafast', '-bf', '3', '-x264-params', 'b-pyramid=normal:keyint=12']

# name: (file name, ffmpeg arguments after the input); 50 frames each unless said otherwise
ENCODINGS = {
    'xvid-packed-bframes': ('a.avi', ['-c:v', 'libxvid', '-bf', '2', '-g', '12']),
    'mpeg4-unpacked-bframes': ('b.avi', ['-c:v', 'mpeg4', '-vtag', 'XVID', '-bf', '2', '-g', '12']),
    'xvid-no-bframes': ('c.avi', ['-c:v', 'libxvid', '-bf', '0', '-g', '12']),
    'xvid-mp3-audio-longer': ('d.avi', ['-f', 'lavfi', '-i', 'sine=duration=4', '-map', '0:v', '-map', '1:a',
                                        '-c:v', 'libxvid', '-bf', '2', '-g', '12', '-c:a', 'libmp3lame']),
    'h264-bpyramid-avi': ('e.avi', X264_B),
    'h264-bpyramid-mp4': ('f.mp4', X264_B),
    'h264-open-gop-mkv': ('g.mkv', ['-c:v', 'libx264', '-preset', 'ultrafast', '-bf', '3',
                                    '-x264-params', 'open-gop=1:keyint=10']),
    'vp9-webm': ('h.webm', ['-c:v', 'libvpx-vp9', '-deadline', 'realtime', '-cpu-used', '8', '-g', '10']),
    'msmpeg4v3-avi': ('i.avi', ['-c:v', 'msmpeg4', '-g', '12']),
    'cinepak-avi': ('j.avi', ['-c:v', 'cinepak', '-g', '12']),
    'vfr-mkv': ('k.mkv', ['-vf', "setpts='PTS+0.4*random(1)/TB'", '-fps_mode', 'vfr', *X264_B]),
    'audio-before-video-mp4': ('l.mp4', ['-f', 'lavfi', '-i', 'sine=duration=1', '-map', '0:v', '-map', '1:a',
                                         '-itsoffset', '0.5', *X264_B, '-c:a', 'aac']),
    'h264-mov': ('m.mov', X264_B),
    'one-frame': ('n.avi', ['-frames:v', '1', '-c:v', 'mpeg4', '-vtag', 'XVID', '-bf', '2']),
    'three-frames': ('o.mp4', ['-frames:v', '3', *X264_B]),
    # B-frames muxed without composition offsets (a stream copy that lost them): every pts equals its dts
    'h264-pts-equal-dts-mp4': ('u.mp4', [*X264_B, '-bsf:v', 'setts=pts=DTS']),
    # odd sizes: the chroma planes are resampled to make RGB, so the scaler's filter decides every value
    'ffv1-odd-321x241-mkv': ('q.mkv', ['-vf', 'scale=321:241', '-frames:v', '12', '-c:v', 'ffv1']),
    'vp9-odd-175x143-webm': ('r.webm', ['-vf', 'scale=175:143', '-c:v', 'libvpx-vp9', '-deadline', 'realtime',
                                        '-cpu-used', '8', '-g', '10']),
    'mjpeg-odd-97x73-avi': ('s.avi', ['-vf', 'scale=97:73', '-c:v', 'mjpeg']),
    'xvid-odd-175x143-avi': ('t.avi', ['-vf', 'scale=175:143', '-c:v', 'mpeg4', '-vtag', 'XVID', '-bf', '2',
                                       '-g', '12']),
}
TRUNCATED = {  # name: (intact encoding, fraction of the bytes kept)
    'xvid-packed-cut': ('xvid-packed-bframes', 0.6),
    'mp4-faststart-cut': ('h264-mp4-faststart', 0.6),
}


def encode(path, args):
    command = [FFMPEG, '-y', '-v', 'error', *SOURCE]
    if args[:2] == ['-f', 'lavfi']:  # a second input (audio) goes before the output options
        command += args[:4]
        args = args[4:]
    if '-itsoffset' in args:  # an input option: delay the video input itself
        at = args.index('-itsoffset')
        command = [FFMPEG, '-y', '-v', 'error', '-itsoffset', args[at + 1], *SOURCE, *command[len(SOURCE) + 4:]]
        args = args[:at] + args[at + 2:]
    subprocess.run([*command, *args, path], check=True)


def command_line_decode(path):
    """ffmpeg's own sequential decode of the first video stream, every frame once: the reference."""
    info = video.video_info(path)
    raw = subprocess.run([FFMPEG, '-v', 'quiet', '-i', path, '-map', '0:v:0', '-fps_mode', 'passthrough',
                          '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-'], capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp('encodings')
    made = {}
    for name, (file_name, args) in ENCODINGS.items():
        made[name] = str(folder / file_name)
        encode(made[name], args)
    faststart = str(folder / 'p.mp4')
    encode(faststart, [*X264_B, '-movflags', '+faststart'])
    made['h264-mp4-faststart'] = faststart
    for name, (source, keep) in TRUNCATED.items():
        data = open(made[source], 'rb').read()
        made[name] = str(folder / f'cut-{os.path.basename(made[source])}')
        with open(made[name], 'wb') as f:
            f.write(data[:int(len(data) * keep)])
    return made


@pytest.mark.parametrize('name', [*ENCODINGS, 'h264-mp4-faststart', *TRUNCATED])
def test_sequential_decoding_is_ffmpegs(clips, name):
    frames = video.read_frames(clips[name])
    reference = command_line_decode(clips[name])
    assert frames.shape == reference.shape and np.array_equal(frames, reference), name


@pytest.mark.parametrize('name', [*ENCODINGS, 'h264-mp4-faststart', *TRUNCATED])
def test_random_access_equals_sequential_decoding(clips, name):
    path = clips[name]
    frames, info = video.read_frames(path), video.video_info(path)
    rng = np.random.RandomState(0)
    order = rng.permutation(len(frames))  # every index, in random order, as the training sampler draws them
    wrong = [i for i in order if not np.array_equal(video.read_frame(path, int(i), info).rgb, frames[i])]
    assert not wrong, f'{name}: {len(wrong)} of {len(frames)} frames differ, e.g. {sorted(wrong)[:5]}'
    # past the end (a header that over-states the length): the last decodable frame
    last = video.read_frame(path, len(frames) + 5, info)
    assert np.array_equal(last.rgb, frames[-1]) and last.index == len(frames) - 1


@pytest.mark.parametrize('name', [*ENCODINGS, 'h264-mp4-faststart', *TRUNCATED])
def test_runs_of_frames_equal_sequential_decoding(clips, name):
    """read_frames_from (the flow stream's training stacks read L+1 frames at a random place) gives the frames of
    sequential decoding, entered anywhere, running past the end included."""
    path = clips[name]
    frames, info = video.read_frames(path), video.video_info(path)
    for start in sorted({0, 1, len(frames) // 3, len(frames) // 2, max(len(frames) - 4, 0), len(frames) - 1}):
        run = video.read_frames_from(path, start, 4, info)
        first = min(start, len(frames) - 1)  # past the end: the last frame alone
        want = frames[first:start + 4]
        assert [f.index for f in run] == list(range(first, first + len(want))), (name, start)
        assert all(np.array_equal(f.rgb, w) for f, w in zip(run, want)), (name, start)


@pytest.mark.parametrize('name', [*ENCODINGS, 'h264-mp4-faststart'])
def test_preprocessing_the_decoders_frames_is_preprocessing_the_command_lines_rgb(clips, name):
    """preprocess_frame on the decoder's own frames (what extraction and training give it) equals it on the RGB
    frames ffmpeg's command line writes, bit for bit: down- and upscaled, flipped, cropped and rotated."""
    frames, reference = list(video.iter_frames(clips[name])), command_line_decode(clips[name])
    augmentations = [preprocessing.NO_AUGMENTATION, preprocessing.Augmentation(True, None, 0.0),
                     preprocessing.Augmentation(False, (5, 3, 80, 70), 4.0)]
    for i in sorted({0, len(frames) // 2, len(frames) - 1}):
        for size, augmentation in zip((40, 128, 64), augmentations):
            fast, simple = (preprocessing.preprocess_frame(f, size, augmentation) for f in (frames[i], reference[i]))
            assert np.array_equal(fast, simple), (name, i, size, augmentation)


def test_preprocessing_works_in_a_forked_loader_after_the_parent_used_it(clips):
    """Fine-tuning's loader processes are forked from a process that may have preprocessed frames already: the
    child must not inherit a scaler whose worker threads did not come along (it would wait forever)."""
    import multiprocessing
    frame, odd = (next(video.iter_frames(clips[name])) for name in ('xvid-packed-bframes', 'xvid-odd-175x143-avi'))
    # the scaler, and the odd sizes' graph
    want = preprocessing.preprocess_frame(frame, 40), preprocessing.preprocess_frame(odd, 40)
    queue = multiprocessing.get_context('fork').SimpleQueue()
    child = multiprocessing.get_context('fork').Process(
        target=lambda: queue.put((preprocessing.preprocess_frame(frame, 40), preprocessing.preprocess_frame(odd, 40))))
    child.start()
    child.join(30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0 and all(np.array_equal(a, b) for a, b in zip(queue.get(), want))


@pytest.mark.parametrize('size', ['320x240', '340x256'])
def test_preprocessing_resizes_like_pillows_bilinear(tmp_path, size):
    """preprocess_frame v2 (FFmpeg's bilinear scaler) against v1 (Pillow's bilinear resize of the same RGB frame)
    to the network's 224x224, from UCF-101's frame size and from a width that is not a multiple of 16."""
    from PIL import Image
    path = str(tmp_path / 'clip.avi')
    subprocess.run([FFMPEG, '-y', '-v', 'error', '-f', 'lavfi', '-i', f'testsrc2=size={size}:rate=25',
                    '-frames:v', '6', '-c:v', 'libxvid', path], check=True)
    differences = []
    for frame in video.iter_frames(path):
        rgb = np.asarray(Image.fromarray(frame.rgb).resize((224, 224), Image.BILINEAR), np.float32)
        v1 = np.stack([rgb[:, :, 2 - c] - preprocessing.MEAN_BGR[c] for c in range(3)])
        differences.append(np.abs(preprocessing.preprocess_frame(frame, 224) - v1))
    d = np.stack(differences)
    assert d.max() <= 2 and d.mean() < 0.1, (d.max(), d.mean())


@pytest.mark.parametrize('name', ['h264-bpyramid-mp4', 'h264-open-gop-mkv', 'vp9-webm', 'vfr-mkv', 'h264-mov'])
def test_timestamped_containers_are_entered_at_a_keyframe(clips, name):
    """The fast path is used where it is exact: most frames come from a keyframe seek, not the fallback."""
    path = clips[name]
    info = video.video_info(path)
    assert info.seek is not None and len(info.seek.key_pts) > 1
    container, stream = video._open_video(path)
    with container:
        found = sum(video._seek_frames(container, stream, info.seek, i, 1) is not None for i in range(info.stored))
    assert found >= 0.9 * info.stored


def test_avi_is_never_entered_by_timestamp(clips):
    """AVI stores no presentation timestamps for reordered frames: its clips are decoded from the start."""
    for name, (file_name, _) in ENCODINGS.items():
        if file_name.endswith('.avi'):
            assert video.video_info(clips[name]).seek is None, name


@pytest.mark.parametrize('name', [*ENCODINGS, 'h264-mp4-faststart'])
def test_intact_clips_claim_what_they_hold(clips, name):
    """The count comes from the container's packets: audio longer than the video, a variable frame rate, or
    packed B-frames do not make an intact clip look truncated."""
    info = video.video_info(clips[name])
    decoded = len(video.read_frames(clips[name]))
    assert not info.truncated and info.frames == info.stored == decoded, (name, info.frames, decoded)
    expected = {'one-frame': 1, 'three-frames': 3, 'xvid-packed-bframes': 48, 'xvid-mp3-audio-longer': 48,
                'vfr-mkv': None, 'ffv1-odd-321x241-mkv': 12, 'h264-pts-equal-dts-mp4': 48}.get(name, 50)
    assert expected is None or decoded == expected, (name, decoded)


@pytest.mark.parametrize('name', TRUNCATED)
def test_truncated_clips_claim_more_than_they_hold(clips, name):
    info = video.video_info(clips[name])
    decoded = len(video.read_frames(clips[name]))
    assert info.truncated and info.frames >= 48 and 0 < decoded < info.frames - 1, (name, info, decoded)


def test_unreadable_files_say_why(tmp_path, clips):
    cut = tmp_path / 'v_X_g01_c01.mp4'
    data = open(clips['h264-bpyramid-mp4'], 'rb').read()
    cut.write_bytes(data[:len(data) // 2])  # the index (moov) is at the end of a plain MP4: gone
    with pytest.raises(video.VideoError, match='moov atom not found'):
        video.video_info(str(cut))
    noise = tmp_path / 'noise.avi'
    noise.write_bytes(np.random.RandomState(0).bytes(5000))
    with pytest.raises(video.VideoError, match='not a readable video'):
        video.read_frame(str(noise), 0)
    audio = tmp_path / 'audio.mp4'
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'sine=duration=1', str(audio)], check=True)
    with pytest.raises(video.VideoError, match='holds no video stream'):
        video.video_info(str(audio))
    with pytest.raises(video.VideoError, match='file not found'):
        video.iter_frames(str(tmp_path / 'missing.avi')).__next__()


def test_synthetic_set_has_packed_and_unpacked_bframes(tiny_ucf):
    """Like UCF-101, the synthetic clips carry B-frames, some DivX-style packed, so the demo exercises them."""
    import av
    from av.video.frame import PictureType
    root, written = tiny_ucf
    packed, kinds = 0, set()
    for rel in sorted(written)[:6]:
        path = os.path.join(root, 'UCF-101', rel)
        with open(path, 'rb') as f:
            packed += bool(re.search(rb'DivX\d+b\d+p', f.read()))
        with av.open(path) as container:
            kinds |= {PictureType(frame.pict_type) for frame in container.decode(video=0)}
    assert PictureType.B in kinds and 0 < packed < 6


def test_loaders_follow_the_cpus_this_job_may_use():
    """A job confined to one CPU (a Slurm/PBS cpuset; here sched_setaffinity) starts one loader, not one per core
    of the node."""
    code = ('import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import frameBasedTrain; '
            'print(frameBasedTrain.parse_args([]).loaderjob)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == '1', out.stderr
