"""Fine-tuning's data: one frame of each clip per example (RandomFrameDataset), and the loader processes that
prepare them in parallel (LoaderIterator, Chainer's MultiprocessIterator made safe for Ctrl-C, and the signal by
which a loader that meets a class with no readable clip stops the run instead of leaving it waiting)."""
import collections
import os
import signal
import sys
import threading

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import chainer
import numpy as np

from ucf.errors import DataError, warn
from ucf.flow import FlowError, clip_fields, frames_for_stack, stack_fields, stack_from_frames, stacked
from ucf.preprocessing import NO_AUGMENTATION, preprocess_frame
from ucf.runcontrol import Progress
from ucf.video import VideoError, read_frame, read_frames_from, read_rgb, video_info


def cached_bytes(value):
    """Memory a cached clip holds: a list of frames, or an array of fields."""
    return sum(frame.nbytes for frame in value) if isinstance(value, list) else value.nbytes


class RandomFrameDataset(chainer.dataset.DatasetMixin):
    """Example i: one frame of clip i, preprocessed, and the clip's label; with `flow` (FlowSettings), the flow
    stream's input for that frame instead: its stack of flow fields (ucf/flow.py), exactly as extraction makes it.

    train=True draws a random frame and, with `augment` (rng, width, height -> an Augmentation: e.g.
    helperFunctions.random_augmentation), random augmentations each time; train=False takes the middle frame
    unaugmented (a fixed evaluation set). ucf.video.read_frame returns exactly the frame that sequential decoding
    shows at that index, whatever the encoding (B-frames in AVI included). A clip that cannot be read is reported
    once and replaced by another clip of the same class, so one bad file cannot stop a long run. With `cache_mb`,
    decoded clips (RGB) are kept in memory up to that size. A flow stack is flipped (its x planes negated) where
    the augmentation says flip; the other augmentations are the RGB stream's.
    """

    def __init__(self, data_root, clips, insize, train=True, augment=None, cache_mb=0, seed=0, class_names=None,
                 flow=None):
        self.data_root, self.clips, self.insize, self.train, self.flow = data_root, clips, insize, train, flow
        self.class_names = class_names or {c.label: str(c.label) for c in clips}
        self.seed, self.home_pid = seed, os.getpid()
        self.cache, self.cache_bytes, self.cache_used = collections.OrderedDict(), cache_mb << 20, 0
        self.augment = augment
        self.by_label = {}
        for i, clip in enumerate(clips):
            self.by_label.setdefault(clip.label, []).append(i)
        self.info, self.bad, self._rng, self._pid, self._reported = {}, set(), None, None, None

    def __len__(self):
        return len(self.clips)

    @property
    def rng(self):
        # Loader processes are forked from one parent: each needs its own random stream, not a copy of it.
        # In the training process itself (--loaderjob 0) the stream follows --seed, so runs repeat exactly.
        if self._pid != os.getpid():
            pid = os.getpid()
            self._rng = np.random.RandomState(self.seed if pid == self.home_pid else (self.seed + pid) % 2 ** 32)
            self._pid = pid
        return self._rng

    def decoded(self, i, path):
        """What the examples of clip i are made of, from the in-memory cache (least recently used clips leave first):
        its frames (RGB arrays), or for the flow stream the network's planes of all of its fields
        (ucf.flow.clip_fields: each field is computed once, whatever the epochs)."""
        if i in self.cache:
            self.cache.move_to_end(i)
        else:
            frames = read_rgb(path)
            self.cache[i] = clip_fields(frames, self.flow, self.insize) if self.flow else frames
            self.cache_used += cached_bytes(self.cache[i])
            while self.cache_used > self.cache_bytes and len(self.cache) > 1:
                self.cache_used -= cached_bytes(self.cache.popitem(last=False)[1])
        return self.cache[i]

    def frame(self, i):
        path = os.path.join(self.data_root, self.clips[i].path)
        if self.cache_bytes:
            frames = self.decoded(i, path)
            count = len(frames) + 1 if self.flow else len(frames)  # a clip's fields are one fewer than its frames
        else:
            if i not in self.info:
                self.info[i] = video_info(path)
            count = self.info[i].stored
        # The last frame of a UCF-101 clip is often corrupt: draw from the others.
        last = max(count - 2, 0)
        index = self.rng.randint(0, last + 1) if self.train else last // 2
        if self.flow:
            return self.flow_stack(i, path, index, last + 1, frames if self.cache_bytes else None)
        rgb = frames[index] if self.cache_bytes else read_frame(path, index, self.info[i]).rgb
        augmentation = (self.augment(self.rng, rgb.shape[1], rgb.shape[0]) if self.train and self.augment
                        else NO_AUGMENTATION)
        return preprocess_frame(rgb, self.insize, augmentation)

    def flow_stack(self, i, path, index, n_frames, cached=None):
        """The flow stream's input for frame `index` of clip i, which counts n_frames usable frames: its stack's
        frames decoded (or taken from the cache), the fields computed, flipped with the augmentation's flip."""
        if n_frames < 2:
            raise FlowError(path, 'one frame: no motion to compute flow from')
        first, count = frames_for_stack(index, n_frames, self.flow.stack)
        if cached is not None:  # every field of the clip
            x = stacked(cached[stack_fields(index, n_frames - 1, self.flow.stack)])
        else:
            read = read_frames_from(path, first, count, self.info[i])
            if read[0].index != first or len(read) < count:  # fewer decode than the packets promise
                decodable = read[-1].index + 1
                return self.flow_stack(i, path, min(index, decodable - 1), decodable)
            x = stack_from_frames([f.rgb for f in read], first, index, n_frames, self.flow, self.insize)
        if self.train and self.augment and self.augment(self.rng, self.insize, self.insize).flip:
            x = x[:, :, ::-1].copy()
            x[0::2] *= -1  # the x components point the other way
        return x

    def probe(self):
        """Read every clip's packets once, here, before the loaders fork (they inherit what it found): unreadable
        clips are reported now, and a class left with no readable clip stops the run before it starts."""
        progress = Progress(len(self.clips), 'clips', 'checking the clips: ', interval=10)
        for i, clip in enumerate(self.clips):
            try:
                self.info[i] = video_info(os.path.join(self.data_root, clip.path))
            except VideoError as e:
                self.bad.add(i)
                warn(f'skipping unreadable clip {e}')
            progress.update()
        for label, members in self.by_label.items():
            if all(i in self.bad for i in members):
                raise self.no_readable_clip(label)

    def no_readable_clip(self, label):
        return DataError(f'no clip of class {self.class_names[label]!r} can be read under {self.data_root}/ (the '
                         'warnings above say why); replace those files, or leave the class out of the lists')

    def get_example(self, i):
        label = self.clips[i].label
        candidates = [i] + [j for j in self.rng.permutation(self.by_label[label]) if j != i]
        for j in candidates:
            if j in self.bad:
                continue
            try:
                return self.frame(j), np.int32(label)
            except VideoError as e:
                self.bad.add(j)
                warn(f'skipping unreadable clip {e}')
        error = self.no_readable_clip(label)
        if os.getpid() not in (self.home_pid, self._reported):  # once per loader process
            # Chainer's MultiprocessIterator would wait forever for this example: tell the training process.
            print(f'error: {error}', file=sys.stderr, flush=True)
            os.kill(self.home_pid, signal.SIGUSR1)
            self._reported = os.getpid()
        raise error


def stop_when_a_loader_fails():
    """In the training process: a loader's SIGUSR1 (its error printed above) ends the run with exit status 1,
    and the iterator's prefetch thread, which the same error ends, adds no traceback."""
    def handler(signum, frame):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # other loaders may signal too: the first one says it
        raise DataError('a frame-loading process stopped (its error is above); no model was written')
    signal.signal(signal.SIGUSR1, handler)
    report = threading.excepthook

    def quiet(hook_args):
        if not isinstance(hook_args.exc_value, DataError):
            report(hook_args)
    threading.excepthook = quiet


class LoaderIterator(chainer.iterators.MultiprocessIterator):
    """Chainer's MultiprocessIterator, its loader processes forked with SIGINT blocked: a Ctrl-C at the instant
    they start went to a child before its set-up ignored SIGINT, killed it, and the parent trained on. Blocked,
    the signal waits and the parent takes it (one line, exit 130) once the processes run; they keep ignoring it."""

    def __next__(self):
        loop = getattr(self, '_prefetch_loop', None)
        if loop is not None and loop.thread is None and not loop.measure_required():
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                loop.launch_thread()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return super().__next__()

    next = __next__
