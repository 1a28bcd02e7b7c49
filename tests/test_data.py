"""The synthetic dataset, video decoding and the shared preprocessing."""
import os

import numpy as np
import pytest
from PIL import Image

import synthetic_ucf101
from helperFunctions import clip_group, random_augmentation, read_class_index, read_split, repeatSequence
from ucf.preprocessing import MEAN_BGR, NO_AUGMENTATION, Augmentation, preprocess_frame
from ucf.video import read_frame, read_frames, video_info


def test_synthetic_layout_and_lists(tiny_ucf):
    root, written = tiny_ucf
    lists = os.path.join(root, 'ucfTrainTestlist')
    classes = read_class_index(lists)
    assert classes == sorted(classes, key=str.lower) and 'HandstandPushups' in classes
    assert {'SlideLeft', 'SlideRight'} <= set(classes)
    for split in (1, 2, 3):
        train, test = read_split(lists, split, 'train'), read_split(lists, split, 'test')
        assert {c.path for c in train} | {c.path for c in test} == set(written)
        assert {clip_group(c.path) for c in test} == set(range(7 * split - 6, 7 * split + 1))
        assert all(classes[c.label] == c.path.split('/')[0] for c in train + test)
    with open(os.path.join(lists, 'trainlist01.txt'), 'rb') as f:
        assert f.read().count(b'\r\n') == len(read_split(lists, 1, 'train'))
    assert any(p.startswith('HandstandPushups/v_HandStandPushups_g') for p in written)


def test_synthetic_clips_read_back(tiny_ucf):
    root, written = tiny_ucf
    for rel in sorted(written)[::9]:
        path = os.path.join(root, 'UCF-101', rel)
        info = video_info(path)
        frames = read_frames(path)
        assert frames.shape == (written[rel], 48, 64, 3)
        assert (info.width, info.height, info.frames) == (64, 48, written[rel])
        assert info.fps in (25.0, 29.97)
    with open(path, 'rb') as f:
        assert f.read(12)[8:12] == b'AVI '


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic_ucf101.render_clip('SlideLeft', 0, -1, 3, 5, 32, 24, np.random.RandomState(3))
    b = synthetic_ucf101.render_clip('SlideLeft', 0, -1, 3, 5, 32, 24, np.random.RandomState(3))
    assert np.array_equal(a, b)


def test_motion_pair_frames_look_alike():
    """A single frame of SlideLeft and one of SlideRight come from the same distribution: mean object column."""
    def columns(direction):
        found = []
        for seed in range(300):
            frames = synthetic_ucf101.render_clip('x', 0, direction, 2, 16, 32, 24, np.random.RandomState(seed))
            found.append(np.argmax(frames[15].astype(int).sum(axis=(0, 2))))
        return np.array(found)
    left, right = columns(-1), columns(+1)
    assert np.std(left) > 6  # the object is anywhere, not at a fixed place
    # Same distribution of positions: means within 4 standard errors.
    assert abs(left.mean() - right.mean()) < 4 * np.sqrt(left.var() / len(left) + right.var() / len(right))


def test_read_frame_by_seeking_equals_full_decode(tiny_ucf):
    root, written = tiny_ucf
    for rel in sorted(written)[:3]:
        path = os.path.join(root, 'UCF-101', rel)
        frames, info = read_frames(path), video_info(path)
        for i in sorted({0, 1, 2, len(frames) // 2, len(frames) - 2, len(frames) - 1}):
            assert np.array_equal(read_frame(path, i, info).rgb, frames[i]), (rel, i, info.fps)


def test_preprocess_frame_is_bgr_minus_mean():
    # red rises left to right, green top to bottom, blue is flat: any bilinear resize keeps ramps ramps
    ys, xs = np.mgrid[0:48, 0:64]
    frame = np.stack([xs * 4, ys * 5, np.full_like(xs, 200)], axis=2).astype(np.uint8)
    x = preprocess_frame(frame, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert np.all(x[0] == np.float32(200) - MEAN_BGR[0])  # channel 0 is blue
    resized = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR), np.float32)
    inner = (slice(1, -1), slice(1, -1))  # the filters treat the border differently
    assert np.abs(x[2][inner] - (resized[:, :, 0][inner] - MEAN_BGR[2])).max() <= 1  # red
    assert np.abs(x[1][inner] - (resized[:, :, 1][inner] - MEAN_BGR[1])).max() <= 1  # green
    assert np.all(np.diff(x[2], axis=1) > 0) and np.all(np.diff(x[1], axis=0) > 0)
    flipped = preprocess_frame(frame, 32, Augmentation(True, None, 0.0))
    assert np.array_equal(flipped, x[:, :, ::-1])
    batch = np.zeros((2, 3, 32, 32), np.float32)
    slot = batch[1]
    assert preprocess_frame(frame, 32, out=slot) is slot and np.array_equal(batch[1], x) and not batch[0].any()


def test_augmentations():
    rng = np.random.RandomState(0)
    draws = [random_augmentation(rng, 320, 240, flip=True, crop=True, rotate=True) for _ in range(200)]
    assert 60 < sum(a.flip for a in draws) < 140
    assert all(a.crop[2] - a.crop[0] == 280 and a.crop[3] - a.crop[1] == 210 for a in draws)
    assert all(0 <= a.crop[0] and a.crop[2] <= 320 for a in draws)
    assert all(abs(a.angle) <= 10 for a in draws) and len({a.angle for a in draws}) > 100
    zoom = [random_augmentation(rng, 320, 240, flip=False, resize=True) for _ in range(50)]
    assert len({z.crop[2] - z.crop[0] for z in zoom}) > 10 and not any(z.flip for z in zoom)
    assert random_augmentation(rng, 320, 240, flip=False) == NO_AUGMENTATION
    frame = np.zeros((240, 320, 3), np.uint8)
    assert preprocess_frame(frame, 64, draws[0]).shape == (3, 64, 64)


def test_repeat_sequence():
    seq = np.arange(4)
    assert repeatSequence(seq, 11).tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2]
    assert repeatSequence(seq, 3).tolist() == [0, 1, 2]
    features = np.arange(6).reshape(3, 2)
    assert repeatSequence(features, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [2, 3]]
    with pytest.raises(ValueError):
        repeatSequence(seq[:0], 3)
