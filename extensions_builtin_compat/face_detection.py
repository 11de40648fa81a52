"""An identity photo's face region when the user paints no mask: the largest frontal face that OpenCV's Haar cascade
finds. The webui installs opencv-python, whose package ships the cascade; the webui's own face-restoration helpers
would download their detector's weights on first use, which an offline webui cannot.
"""
from __future__ import annotations

import importlib

import numpy as np
from PIL import Image, ImageDraw

from dreamartist.errors import InputError
from dreamartist.images import load_image

CASCADE = "haarcascade_frontalface_default.xml"
MIN_FACE = 24  # pixels: the cascade's own window
NO_DETECTOR = ("This webui has no face detector (OpenCV with its face cascade); paint the face white in the face "
               "region mask.")
NO_FACE = "No face was found in the picture; paint the face white in the face region mask."


def _classifier():
    try:
        cv2 = importlib.import_module("cv2")
    except ImportError:
        raise InputError(NO_DETECTOR) from None
    classifier = cv2.CascadeClassifier(f"{cv2.data.haarcascades}{CASCADE}")
    if classifier.empty():
        raise InputError(NO_DETECTOR)
    return cv2, classifier


def face_mask(image: Image.Image) -> Image.Image:
    """White on black: the box of the largest face found in ``image``; InputError (one sentence) when there is no
    detector or no face."""
    cv2, classifier = _classifier()
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    faces = classifier.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
    if len(faces) == 0:
        raise InputError(NO_FACE)
    x, y, w, h = (int(v) for v in max(faces, key=lambda face: int(face[2]) * int(face[3])))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((x, y, x + w - 1, y + h - 1), fill=255)
    return mask


def face_region(image, mask):
    """The face region the user painted, or else the one found in ``image`` (bytes or a PIL image)."""
    return mask if mask is not None else face_mask(load_image(image))
