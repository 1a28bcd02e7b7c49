"""Write a small synthetic UCF-101: real XVID AVI clips in the exact UCF-101 layout, with split lists.

    python synthetic_ucf101.py --out synthetic --classes 8

writes synthetic/UCF-101/<Class>/v_<Class>_gGG_cCC.avi and synthetic/ucfTrainTestlist/{classInd,trainlist0N,
testlist0N}.txt (CRLF, 25 groups per class, test groups 1-7 / 8-14 / 15-21 for splits 1 / 2 / 3).

Two kinds of classes test what the handout is about:
- appearance classes: a scene whose colours and shape give the class away in any single frame;
- motion pairs (SlideLeft/SlideRight, Grow/Shrink, SpinClockwise/SpinCounterClockwise, FadeIn/FadeOut): both
  members of a pair share one appearance and differ only in the direction of a periodic motion. Every frame's
  position in the cycle is uniformly distributed, so one frame carries no information about which member it is:
  a single-frame model is at chance (50%) inside a pair, a sequence model is not.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import colorsys
import multiprocessing
import os
import sys

import numpy as np

from ucf.files import atomic_path
from ucf.flags import nonnegative_int, positive_int
from ucf.runcontrol import usable_cpus
from ucf.video import video_info

# (direction -1, direction +1): the second member's motion runs forward through the cycle, the first backward.
MOTIONS = [('SlideLeft', 'SlideRight'), ('Shrink', 'Grow'), ('SpinCounterClockwise', 'SpinClockwise'),
           ('FadeOut', 'FadeIn')]
# HandstandPushups comes first on purpose: like the real UCF-101, its files are named v_HandStandPushups_*.
APPEARANCES = ['HandstandPushups', 'Archery', 'Basketball', 'Bowling', 'Drumming', 'Fencing', 'Rowing', 'Surfing',
               'Typing', 'YoYo', 'Billiards', 'Diving']
FILE_PREFIX = {'HandstandPushups': 'HandStandPushups'}
SHAPES = ['disk', 'square', 'ring', 'cross']
CODECS = ('libxvid', 'mpeg4')


def class_specs(n_classes, n_pairs=None):
    """[(name, family, direction)]: families index appearances; direction is +1/-1 for motion pairs, 0 else."""
    n_pairs = min(len(MOTIONS), n_classes // 4 if n_pairs is None else n_pairs)
    specs = []
    for p in range(n_pairs):
        specs += [(MOTIONS[p][0], p, -1), (MOTIONS[p][1], p, +1)]
    for a in range(n_classes - 2 * n_pairs):
        base = APPEARANCES[a % len(APPEARANCES)]
        name = base if a < len(APPEARANCES) else f'{base}{a // len(APPEARANCES) + 1}'
        specs.append((name, n_pairs + a, 0))
    return sorted(specs, key=lambda s: s[0].lower())


def family_look(family, n_families):
    """Background colour, object colour and shape shared by every clip of a family."""
    hue = family / n_families  # evenly spread, so that no two families share a colour
    background = np.array(colorsys.hsv_to_rgb(hue, 0.45, 0.55)) * 255
    foreground = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.95)) * 255
    return background, foreground, SHAPES[family % len(SHAPES)]


def render_clip(name, family, direction, n_families, n_frames, width, height, rng, true_flow=None):
    """(n_frames, height, width, 3) uint8 frames of one clip. With a list `true_flow`, the true motion is appended
    to it: for each frame but the last, the flow field (height x width x 2, x then y) that carries the frame's
    object pixels to the next frame (the static scene: 0), or None where the object leaves and re-enters the
    frame (a slide's cycle wrapping round) or only changes brightness (a fade: no motion, but not brightness
    constancy either). Nothing it computes touches `rng`: the frames are the same with or without it."""
    background, foreground, shape = family_look(family, n_families)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # A per-clip low-frequency texture and brightness so that clips of a class are not identical.
    fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
    texture = 18 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
    scene = np.clip(background * rng.uniform(0.8, 1.2) + texture[..., None], 0, 255).astype(np.float32)
    size = min(width, height)
    radius = size * rng.uniform(0.12, 0.2)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    cycle = rng.uniform(0, 1)                      # where in its periodic motion the clip starts
    period = rng.uniform(0.6, 1.0) * max(n_frames, 24)  # frames per cycle: about one cycle per clip
    motion = family if direction else None  # which of MOTIONS moves this clip
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    states = []
    for t in range(n_frames):
        u = (cycle + direction * t / period) % 1.0  # position in the cycle, uniform over [0, 1) at any t
        x, y, r, brightness = cx, cy, radius, 1.0
        if motion == 0:
            x = u * (width + 2 * radius) - radius
        elif motion == 1:
            r = size * (0.06 + 0.3 * u)
        elif motion == 2:  # clockwise on screen, where y points down
            x = width / 2 + 0.3 * size * np.cos(2 * np.pi * u)
            y = height / 2 + 0.3 * size * np.sin(2 * np.pi * u)
        elif motion == 3:
            brightness = 0.15 + 0.85 * u
        elif motion is None:  # appearance classes jitter in place, without a direction
            x += rng.normal(0, 0.01 * size)
            y += rng.normal(0, 0.01 * size)
        dx, dy = np.abs(xx - x), np.abs(yy - y)
        if shape == 'disk':
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif shape == 'square':
            mask = (dx <= r) & (dy <= r)
        elif shape == 'ring':
            d2 = dx ** 2 + dy ** 2
            mask = (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
        else:
            mask = ((dx <= r) & (dy <= 0.3 * r)) | ((dy <= r) & (dx <= 0.3 * r))
        frame = np.where(mask[..., None], foreground * brightness, scene * brightness)
        frame += rng.normal(0, 4, size=(1, width, 1)).astype(np.float32)  # cheap per-frame sensor noise
        frames[t] = np.clip(frame, 0, 255)
        states.append((x, y, r, mask))
    if true_flow is not None:
        fade = motion == 3
        true_flow.extend([None] * (n_frames - 1) if fade else
                         true_motion(states, xx, yy, wraps=motion_wraps(states, width)))
    return frames


def motion_wraps(states, width):
    """The steps at which an object's position jumps (a slide's cycle wrapping round): no motion is true there."""
    return {t for t in range(len(states) - 1) if abs(states[t + 1][0] - states[t][0]) > width / 2}


def true_motion(states, xx, yy, wraps=()):
    """The flow fields between consecutive states (x, y, radius, mask) of a clip's object: every object pixel
    moves with the object's centre, and scales about it as its radius changes; the scene stays."""
    fields = []
    for t in range(len(states) - 1):
        if t in wraps:
            fields.append(None)
            continue
        (x0, y0, r0, mask), (x1, y1, r1, _) = states[t], states[t + 1]
        scale = r1 / r0
        field = np.zeros(mask.shape + (2,), np.float32)
        field[..., 0] = np.where(mask, x1 + (xx - x0) * scale - xx, 0)
        field[..., 1] = np.where(mask, y1 + (yy - y0) * scale - yy, 0)
        fields.append(field)
    return fields


def write_avi(path, frames, fps, codec='libxvid', quality=3, b_frames=2):
    """Encode frames as an MPEG-4 part 2 AVI with B-frames (tag XVID, like UCF-101), atomically; returns the number
    of frames the file holds.

    libxvid stores B-frames "packed" (DivX-style, as many UCF-101 clips do), and ffmpeg's libxvid wrapper never
    writes the last two frames of such a clip; ffmpeg's own mpeg4 encoder stores them unpacked and keeps all.
    """
    import imageio_ffmpeg
    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            tmp, (width, height), fps=fps, codec=codec, quality=None, macro_block_size=1,
            output_params=['-qscale:v', str(quality), '-g', '12', '-bf', str(b_frames), '-vtag', 'XVID'],
            ffmpeg_log_level='error')
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return video_info(tmp).stored


def _write_clip(job):
    root, rel, name, family, direction, n_families, n_frames, fps, width, height, seed, codec = job
    rng = np.random.RandomState(seed)
    frames = render_clip(name, family, direction, n_families, n_frames, width, height, rng)
    return rel, write_avi(os.path.join(root, rel), frames, fps, codec)


def write_lists(list_dir, classes, clips):
    """classInd.txt and the three train/test lists, with UCF-101's CRLF line endings."""
    os.makedirs(list_dir, exist_ok=True)

    def write(name, lines):
        with atomic_path(os.path.join(list_dir, name)) as tmp, open(tmp, 'w', newline='') as f:
            f.write(''.join(line + '\r\n' for line in lines))

    write('classInd.txt', [f'{i + 1} {c}' for i, c in enumerate(classes)])
    for split in (1, 2, 3):
        test_groups = range(7 * split - 6, 7 * split + 1)
        write(f'trainlist{split:02d}.txt',
              [f'{rel} {label + 1}' for rel, label, group in clips if group not in test_groups])
        write(f'testlist{split:02d}.txt', [rel for rel, label, group in clips if group in test_groups])


def make_dataset(out, n_classes=8, n_pairs=None, groups=25, clips_per_group=(1, 2), frames=(40, 160),
                 width=320, height=240, seed=0, jobs=None, codec='mixed'):
    """Write the dataset under `out`; returns {relative clip path: number of frames it holds}.

    codec 'mixed' alternates libxvid (packed B-frames) and ffmpeg's mpeg4 (unpacked B-frames) clip by clip.
    """
    specs = class_specs(n_classes, n_pairs)
    n_families = max(f for _, f, _ in specs) + 1
    rng = np.random.RandomState(seed)
    data_root = os.path.join(out, 'UCF-101')
    clips, jobs_list = [], []
    for label, (name, family, direction) in enumerate(specs):
        prefix = FILE_PREFIX.get(name, name)
        for group in range(1, groups + 1):
            for c in range(1, rng.randint(clips_per_group[0], clips_per_group[1] + 1) + 1):
                rel = f'{name}/v_{prefix}_g{group:02d}_c{c:02d}.avi'
                n_frames = int(rng.randint(frames[0], frames[1] + 1))
                fps = float(rng.choice([25.0, 29.97]))
                clips.append((rel, label, group))
                jobs_list.append((data_root, rel, name, family, direction, n_families, n_frames, fps, width, height,
                                  int(rng.randint(2 ** 31)),
                                  CODECS[len(jobs_list) % len(CODECS)] if codec == 'mixed' else codec))
    with multiprocessing.Pool(jobs or usable_cpus()) as pool:
        written = dict(pool.imap_unordered(_write_clip, jobs_list, chunksize=4))
    write_lists(os.path.join(out, 'ucfTrainTestlist'), [s[0] for s in specs], clips)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', '-o', default='synthetic', help='folder to write UCF-101/ and ucfTrainTestlist/ into')
    p.add_argument('--classes', type=positive_int, default=8, help='number of classes')
    p.add_argument('--pairs', type=nonnegative_int, default=None,
                   help='motion pairs among them (default: classes // 4)')
    p.add_argument('--groups', type=positive_int, default=25, help='groups per class (UCF-101 has 25)')
    p.add_argument('--clips-per-group', type=positive_int, nargs=2, default=(1, 2), metavar=('MIN', 'MAX'))
    p.add_argument('--frames', type=positive_int, nargs=2, default=(40, 160), metavar=('MIN', 'MAX'),
                   help='clip length range in frames (some below the 120 of an LSTM sequence)')
    p.add_argument('--width', type=positive_int, default=320)
    p.add_argument('--height', type=positive_int, default=240)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--jobs', '-j', type=positive_int, default=None,
                   help='encoding processes (default: the cores this process may use)')
    p.add_argument('--codec', default='mixed', choices=('mixed', *CODECS),
                   help='libxvid: packed B-frames; mpeg4: unpacked B-frames; mixed: both, clip by clip')
    args = p.parse_args(argv)
    if args.groups < 21:
        p.error('--groups must be at least 21: the three splits test groups 1-7, 8-14 and 15-21')
    for flag, (low, high) in (('--frames', args.frames), ('--clips-per-group', args.clips_per_group)):
        if low > high:
            p.error(f'{flag} {low} {high}: MIN is above MAX')
    if args.width % 2 or args.height % 2 or min(args.width, args.height) < 16:
        p.error(f'--width {args.width} --height {args.height}: XVID needs even sizes of at least 16')
    if (args.pairs or 0) > len(MOTIONS) or (args.pairs or 0) * 2 > args.classes:
        p.error(f'--pairs {args.pairs}: at most {len(MOTIONS)} motion pairs, two classes each, within --classes '
                f'{args.classes}')
    written = make_dataset(args.out, args.classes, args.pairs, args.groups, tuple(args.clips_per_group),
                           tuple(args.frames), args.width, args.height, args.seed, args.jobs, args.codec)
    print(f'wrote {len(written)} clips ({sum(written.values())} frames) of {args.classes} classes to '
          f'{os.path.join(args.out, "UCF-101")} and lists to {os.path.join(args.out, "ucfTrainTestlist")}',
          file=sys.stderr)


if __name__ == '__main__':
    main()


def write_fake_features(out, n_classes=101, groups=25, clips_per_group=(4, 7), frames=(29, 900), dim=1024,
                        seed=0, mean_frames=186, lists=None):
    """Lists plus per-clip feature and prediction .npy files (and the extraction manifest) as saveFeatures_1024.py
    writes them, without videos:
    for testing and benchmarking the packing and normalisation at full UCF-101 scale (with `lists`, the real
    split files: 13,320 clips, about 2.5 million frames). Frame counts follow a log-normal around
    `mean_frames`."""
    from helperFunctions import clip_group, read_class_index, read_split
    from ucf.extraction import ExtractionStore
    from ucf.provenance import make_provenance
    rng = np.random.default_rng(seed)
    store = ExtractionStore({'features': os.path.join(out, 'UCF-101_features'),
                             'predictions': os.path.join(out, 'UCF-101_framePrediction')})
    store.start(make_provenance('saveFeatures_1024.py', tag=f'generated{seed}', split=1, insize=0,
                                preprocessing='none: generated features', options={},
                                model=dict(path='none', digest='generated', split=1, source='write_fake_features')))
    if lists:
        classes = read_class_index(lists)
        clips = sorted({(c.path, c.label, clip_group(c.path)) for s in ('train', 'test')
                        for c in read_split(lists, 1, s)})
        n_classes = len(classes)
    else:
        classes = [f'Class{i:03d}' for i in range(n_classes)]
        clips = []
        for label, name in enumerate(classes):
            for group in range(1, groups + 1):
                for c in range(1, rng.integers(clips_per_group[0], clips_per_group[1] + 1) + 1):
                    clips.append((f'{name}/v_{name}_g{group:02d}_c{c:02d}.avi', label, group))
    write_lists(os.path.join(out, 'ucfTrainTestlist'), classes, clips)
    lengths = np.clip(rng.lognormal(np.log(mean_frames) - 0.18, 0.6, len(clips)), *frames).astype(int)
    total = 0
    for (rel, label, _), n in zip(clips, lengths):
        feature = rng.standard_normal((n, dim), dtype=np.float32)
        feature[:, label % dim] += 2.0
        prediction = np.full((n, n_classes), 0.5 / n_classes, np.float32)
        prediction[:, label] += 0.5
        store.save(rel, {'features': feature, 'predictions': prediction})
        total += n
    return len(clips), total
