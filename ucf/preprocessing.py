"""Frame preprocessing: the one function (preprocess_frame) that fine-tuning and extraction share, so the two can
never disagree about colour order, mean or resizing; PREPROCESSING names it in every extraction's identity."""
import numpy as np
from PIL import Image

from helperFunctions import NO_AUGMENTATION
from ucf.video import GBRP_PLANE_OF_BGR, _rgb_frame, _scaler


# Caffe's ImageNet mean, in the BGR order the VGG16 weights were trained with.
MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


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



# What preprocess_frame does; part of an extraction's identity, so change it when preprocessing changes.
PREPROCESSING = ('rgb (FFmpeg via PyAV) -> FFmpeg scaler bilinear resize -> BGR minus Caffe mean '
                 '(preprocess_frame v2)')
