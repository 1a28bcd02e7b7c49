"""Frame preprocessing: the one function (preprocess_frame) that fine-tuning and extraction share, so the two can
never disagree about colour order, mean or resizing; PREPROCESSING names it in every extraction's identity."""
import collections

import numpy as np
from PIL import Image

from ucf.video import Frame, scaled_bgr

# Caffe's ImageNet mean, in the BGR order the VGG16 weights were trained with.
MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

# What is done to one frame before it is resized: a horizontal flip, a crop box (left, top, right, bottom) or
# None, a rotation in degrees. helperFunctions.random_augmentation draws them for training.
Augmentation = collections.namedtuple('Augmentation', 'flip crop angle')
NO_AUGMENTATION = Augmentation(False, None, 0.0)


def preprocess_frame(frame, size, augmentation=NO_AUGMENTATION, out=None):
    """A frame -> 3 x size x size float32, BGR minus the Caffe mean, as VGG16 expects (into `out` if given).

    `frame` is a decoded Frame (ucf/video.py) or an HxWx3 uint8 RGB array: the RGB frame exactly as FFmpeg's
    command line converts it. Rotation and crop (training's optional augmentations) are done on it with Pillow;
    FFmpeg's scaler resizes it with its bilinear filter into planes B, G, R; a flip reverses the columns; the mean
    is subtracted on the way into the result.

    preprocess_frame v1 resized with Pillow's bilinear filter instead. Both filters are triangles that widen with
    the reduction; their rounding differs: from UCF-101's 320x240 to 224x224 by at most two grey levels, at about
    one value in six, 0.17 on average (tests/test_video.py, tools/bench.py); at reductions of 2x and more, by a few
    levels near sharp edges. This is 2-3x faster than v1 (tools/bench.py); training and extraction share it, so
    they still agree.
    """
    rgb = frame.rgb if isinstance(frame, Frame) else frame
    if augmentation.angle or augmentation.crop is not None:
        image = Image.fromarray(rgb)
        if augmentation.angle:
            image = image.rotate(augmentation.angle, resample=Image.BILINEAR)
        if augmentation.crop is not None:
            image = image.crop(augmentation.crop)
        rgb = np.asarray(image)
    if out is None:
        out = np.empty((3, size, size), np.float32)
    for channel, pixels in enumerate(scaled_bgr(rgb, size)):
        if augmentation.flip:
            pixels = pixels[:, ::-1]
        np.subtract(pixels, MEAN_BGR[channel], out=out[channel], dtype=np.float32)
    return out


# What preprocess_frame does; part of an extraction's identity, so change it when preprocessing changes.
PREPROCESSING = ('rgb (FFmpeg via PyAV) -> FFmpeg scaler bilinear resize -> BGR minus Caffe mean '
                 '(preprocess_frame v2)')
