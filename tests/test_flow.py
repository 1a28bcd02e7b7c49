"""The flow stream's input (ucf/flow.py): stacks equal OpenCV called directly on independently decoded frames, at
every position of a clip (its ends included), by the extraction's path and by fine-tuning's; the end rule; clips
too short for flow; the cross-modality initialisation."""
import os
import subprocess

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

import synthetic_ucf101
from ucf import flow, video
from ucf.flow import FlowSettings
from ucf.frame_dataset import RandomFrameDataset
from helperFunctions import Clip

SETTINGS = FlowSettings('dis-ultrafast', 4, 6.0, True)
SIZE = 48


@pytest.fixture(scope='module')
def motion_clips(tmp_path_factory):
    """A sliding disk of 14 frames (more fields than a stack), one of 3 frames (fewer), one of 1 frame; XVID with
    B-frames like UCF-101."""
    folder = tmp_path_factory.mktemp('flow')
    made = {}
    for name, n in (('long', 14), ('short', 3), ('single', 1)):
        frames = synthetic_ucf101.render_clip('SlideRight', 0, +1, 2, n, 96, 72, np.random.RandomState(n))
        path = str(folder / 'SlideRight' / f'v_SlideRight_g01_c{n:02d}.avi')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        synthetic_ucf101.write_avi(path, frames, 25.0, codec='mpeg4')
        made[name] = path
    return folder, made


def command_line_frames(path):
    """The clip's frames as ffmpeg's command line decodes them (independent of ucf/video.py)."""
    info = video.video_info(path)
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-v', 'error', '-i', path, '-f', 'rawvideo', '-pix_fmt',
                          'rgb24', '-'], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def reference_stacks(frames, settings, size):
    """Every frame's stack by OpenCV directly, and the end rule as the docstring of ucf/flow.py states it."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    greys = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA)
             for f in frames]
    planes = []
    for a, b in zip(greys, greys[1:]):
        field = dis.calc(a, b, None).transpose(2, 0, 1)
        field = field - field.mean(axis=(1, 2), keepdims=True)
        planes.append(np.clip(field, -settings.bound, settings.bound) * (127.5 / settings.bound))
    n_fields, stacks = len(planes), []
    for t in range(len(frames)):
        start = max(0, min(t, n_fields - settings.stack))
        chosen = [planes[min(start + k, n_fields - 1)] for k in range(settings.stack)]
        stacks.append(np.concatenate(chosen).astype(np.float32))
    return stacks


@pytest.mark.parametrize('name', ['long', 'short'])
def test_stacks_equal_opencv_on_independently_decoded_frames(motion_clips, name):
    folder, made = motion_clips
    path = made[name]
    want = reference_stacks(command_line_frames(path), SETTINGS, SIZE)
    streamed = list(flow.clip_stacks(video.iter_frames(path), SETTINGS, SIZE))  # extraction's path
    assert [t for t, _ in streamed] == list(range(len(want)))
    for t, planes in streamed:
        assert np.allclose(flow.stacked(planes), want[t], rtol=0, atol=1e-4), (name, t)
    # fine-tuning's: a stack at any place, from the frames read there by random access
    for cache_mb in (0, 1):  # by random access, and from the cache of every field of the clip
        data = RandomFrameDataset(str(folder), [Clip(os.path.relpath(path, folder), 0)], SIZE, flow=SETTINGS,
                                  cache_mb=cache_mb)
        data.info[0] = video.video_info(path)
        cached = data.decoded(0, path) if cache_mb else None
        for t in range(len(want)):
            assert np.allclose(data.flow_stack(0, path, t, len(want), cached), want[t], rtol=0, atol=1e-4), \
                (name, t, cache_mb)


def test_the_end_rule():
    assert flow.stack_fields(0, 5, 4) == [0, 1, 2, 3] and flow.stack_fields(1, 5, 4) == [1, 2, 3, 4]
    assert all(flow.stack_fields(t, 5, 4) == [1, 2, 3, 4] for t in range(2, 6))  # the last frames: the last stack
    assert all(flow.stack_fields(t, 2, 4) == [0, 1, 1, 1] for t in range(3))  # fewer fields than a stack
    assert flow.frames_for_stack(5, 6, 4) == (1, 5) and flow.frames_for_stack(2, 3, 4) == (0, 3)


def test_a_clip_of_one_frame_has_no_flow(motion_clips):
    _, made = motion_clips
    with pytest.raises(flow.FlowError, match='one frame'):
        list(flow.clip_stacks(video.iter_frames(made['single']), SETTINGS, SIZE))


def test_flow_points_where_the_object_moves(motion_clips):
    """The synthetic set's true motion (synthetic_ucf101.true_motion) against the flow of its decoded frames:
    the disk slides right, so the fields over it point right."""
    truth = []
    frames = synthetic_ucf101.render_clip('SlideRight', 0, +1, 2, 14, 96, 72, np.random.RandomState(14), truth)
    decoded = command_line_frames(motion_clips[1]['long'])
    assert len(truth) == len(frames) - 1 and len(decoded) == len(frames)
    for t, true in enumerate(truth):
        if true is None:
            continue
        moving = true[..., 0] > 0
        field = flow.flow_field(cv2.cvtColor(decoded[t], cv2.COLOR_RGB2GRAY),
                                cv2.cvtColor(decoded[t + 1], cv2.COLOR_RGB2GRAY), 'dis-fast')
        assert np.median(field[..., 0][moving]) > 0.3 * np.median(true[..., 0][moving]), t


def test_cross_modality_initialisation(small_vgg):
    import VGGNet
    import VGGNet_1024
    vgg, _ = VGGNet.load_vgg(small_vgg)
    model = VGGNet_1024.from_vgg(vgg, n_classes=4, feature_size=8, train_from='conv1_1', in_channels=6)
    rgb = vgg.conv1_1.W.array
    assert model.conv1_1.W.shape == (rgb.shape[0], 6, 3, 3)
    for channel in range(6):
        assert np.allclose(model.conv1_1.W.array[:, channel], rgb.mean(axis=1))
    assert np.array_equal(model.conv1_1.b.array, vgg.conv1_1.b.array)
    assert np.array_equal(model.conv1_2.W.array, vgg.conv1_2.W.array)
    assert model.in_channels == 6 and model(np.zeros((2, 6, 32, 32), np.float32), np.zeros(2, np.int32)).shape == ()


def test_stacks_at_the_full_input_size(tmp_path):
    """The full path's shapes: a 320x240 XVID clip's stacks at 224x224, 2L channels, the default settings."""
    frames = synthetic_ucf101.render_clip('SlideRight', 0, +1, 2, 14, 320, 240, np.random.RandomState(3))
    path = str(tmp_path / 'clip.avi')
    synthetic_ucf101.write_avi(path, frames, 25.0, codec='mpeg4')
    stacks = list(flow.clip_stacks(video.iter_frames(path), flow.DEFAULT_FLOW, 224))
    assert len(stacks) == 14 and all(len(planes) == flow.DEFAULT_FLOW.stack for _, planes in stacks)
    x = flow.stacked(stacks[0][1])
    assert x.shape == (2 * flow.DEFAULT_FLOW.stack, 224, 224) and x.dtype == np.float32
    assert np.abs(x).max() <= 127.5 and np.abs(x[0::2]).mean() > 0  # the disk's motion is there, within range
