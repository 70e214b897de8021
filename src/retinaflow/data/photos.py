"""Real photographs shipped inside PyPI packages, cut into object instances, backgrounds and distractors.

The sources are the sample images of scikit-image (``skimage.data``: astronaut, cameraman, Chelsea the cat,
coffee, coins, rocket, motorcycle, textures, microscopy, Hubble...) and scikit-learn
(``load_sample_images``: china, flower). Nothing is downloaded: only images that ship inside the wheels
are used. Object classes are distinct real objects; each instance is a crop of a photo with its true box
and an alpha mask (a segmentation for coins and the flower, an ellipse or a rectangle otherwise).

``load_bank()`` is deterministic: the same installed packages give the same bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retinaflow.errors import MissingDependency

# Object classes, in category-id order (id = index + 1).
CLASSES: tuple[str, ...] = ("face", "cat", "cup", "rocket", "motorcycle", "pagoda", "flower", "coin")

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in source pixels


@dataclass(frozen=True)
class Crop:
    """A region of a photo: ``rgb`` (H, W, 3) uint8 and ``alpha`` (H, W) float32 in [0, 1] or None.

    ``box`` is the object's box inside ``rgb`` (x1y1x2y2 pixels). ``shape`` says how a crop without its
    own alpha is masked when pasted: "rect" or "ellipse".
    """

    rgb: np.ndarray
    box: Box
    alpha: np.ndarray | None = None
    shape: str = "rect"


@dataclass
class PhotoBank:
    """Everything the composer draws from: object crops per class, backgrounds, distractors."""

    objects: dict[str, list[Crop]] = field(default_factory=dict)
    backgrounds: list[np.ndarray] = field(default_factory=list)
    distractors: list[Crop] = field(default_factory=list)


def _rgb(image: np.ndarray) -> np.ndarray:
    """Any skimage sample (gray, RGB, RGBA, float) as (H, W, 3) uint8."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _cut(image: np.ndarray, box: Box, shape: str, alpha: np.ndarray | None = None) -> Crop:
    """Crop ``box`` with a 6 % margin of context (so instances can be jittered); box relative to it."""
    x1, y1, x2, y2 = box
    mx, my = round(0.06 * (x2 - x1)), round(0.06 * (y2 - y1))
    h, w = image.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)
    rgb = _rgb(image)[cy1:cy2, cx1:cx2]
    cut_alpha = None if alpha is None else alpha[cy1:cy2, cx1:cx2].astype(np.float32)
    return Crop(np.ascontiguousarray(rgb), (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1), cut_alpha, shape)


def _coins(image: np.ndarray) -> list[Crop]:
    """The 24 coins of ``skimage.data.coins``, segmented (Sobel elevation + watershed, the skimage recipe)."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, segmentation

    markers = np.zeros_like(image)
    markers[image < 30], markers[image > 150] = 1, 2
    mask = ndi.binary_fill_holes(segmentation.watershed(filters.sobel(image), markers) - 1)
    labels, _ = ndi.label(mask)
    crops = []
    for region in measure.regionprops(labels):
        if region.area < 300:
            continue
        y1, x1, y2, x2 = region.bbox
        crops.append(_cut(image, (x1, y1, x2, y2), "rect", (labels == region.label)))
    return crops


def _flower(image: np.ndarray, box: Box) -> Crop:
    """The dahlia of sklearn's flower.jpg, segmented by colour (orange petals on a dark teal background)."""
    from scipy import ndimage as ndi

    rgb = image.astype(np.int16)
    mask = (rgb[..., 0] > 110) & (rgb[..., 0] - rgb[..., 2] > 40)
    x1, y1, x2, y2 = box
    inside = np.zeros_like(mask)
    inside[y1:y2, x1:x2] = True
    labels, _ = ndi.label(ndi.binary_closing(mask & inside, iterations=3))
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    blob = ndi.binary_fill_holes(labels == largest)
    ys, xs = np.nonzero(blob)
    return _cut(image, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), "rect", blob)


def _objects(d: object, china: np.ndarray, flower: np.ndarray) -> dict[str, list[Crop]]:
    astronaut, camera = d.astronaut(), d.camera()  # type: ignore[attr-defined]
    faces = [_cut(f, (0, 0, 25, 25), "ellipse") for f in d.lfw_subset()[:100]]  # type: ignore[attr-defined]
    return {
        "face": [
            _cut(astronaut, (150, 15, 300, 165), "ellipse"),
            _cut(camera, (150, 65, 275, 210), "ellipse"),
            *faces,
        ],
        "cat": [_cut(d.chelsea(), (30, 0, 430, 300), "ellipse")],  # type: ignore[attr-defined]
        "cup": [_cut(d.coffee(), (170, 15, 425, 310), "rect")],  # type: ignore[attr-defined]
        "rocket": [
            _cut(d.rocket(), (298, 125, 347, 410), "rect"),  # type: ignore[attr-defined]
            _cut(astronaut, (352, 0, 470, 290), "rect"),  # the shuttle model behind the astronaut
        ],
        "motorcycle": [_cut(d.stereo_motorcycle()[0], (90, 95, 690, 455), "rect")],  # type: ignore[attr-defined]
        "pagoda": [_cut(china, (60, 25, 370, 400), "rect")],
        "flower": [_flower(flower, (165, 85, 450, 360))],
        "coin": _coins(d.coins()),  # type: ignore[attr-defined]
    }


def _backgrounds(d: object, china: np.ndarray, flower: np.ndarray) -> list[np.ndarray]:
    """Textures and object-free parts of the photos."""
    names = ("brick", "grass", "gravel", "moon", "page", "text", "hubble_deep_field", "cell", "clock")
    images = [_rgb(getattr(d, n)()) for n in names]
    images += [_rgb(d.immunohistochemistry()), _rgb(d.retina())[200:1200, 200:1200]]  # type: ignore[attr-defined]
    images += [
        china[0:200, 380:640],
        flower[:, :160],
        _rgb(d.rocket())[:, :290],  # type: ignore[attr-defined]
        _rgb(d.coffee())[:, 485:],  # type: ignore[attr-defined]
        _rgb(d.stereo_motorcycle()[0])[:, :85],  # type: ignore[attr-defined]
    ]
    return [np.ascontiguousarray(b) for b in images]


def _distractors(d: object) -> list[Crop]:
    """Real things that are not one of the classes: hard negatives pasted like objects, never labelled."""
    astronaut, camera = d.astronaut(), d.camera()  # type: ignore[attr-defined]
    horse = d.horse()  # type: ignore[attr-defined]  # bool silhouette, True = background
    logo = d.logo()  # type: ignore[attr-defined]
    return [
        _cut(_rgb(horse.astype(np.uint8) * 255), (0, 0, 400, 328), "rect", (~horse).astype(np.float32)),
        _cut(logo, (0, 0, 500, 500), "rect", logo[..., 3].astype(np.float32) / 255),
        _cut(astronaut, (0, 0, 100, 300), "rect"),  # flag
        _cut(astronaut, (280, 340, 512, 512), "ellipse"),  # helmet
        _cut(camera, (225, 300, 410, 505), "rect"),  # tripod
        _cut(d.page(), (0, 0, 384, 191), "rect"),  # type: ignore[attr-defined]
    ]


def load_bank() -> PhotoBank:
    """Build the bank from the installed scikit-image and scikit-learn (MissingDependency if absent)."""
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise MissingDependency(
            f"the real-image dataset needs scikit-image and scikit-learn ({exc.name} is missing): "
            "pip install scikit-image scikit-learn"
        ) from None
    china, flower = (np.asarray(im) for im in load_sample_images().images)
    return PhotoBank(
        objects=_objects(data, china, flower),
        backgrounds=_backgrounds(data, china, flower),
        distractors=_distractors(data),
    )
