"""Image sources a user has: arrays, an ``.npz``, a folder of PNGs or JPEGs (``uint8`` images
``(n, H, W, C)`` and optional integer labels), read by :class:`jaxdiff.loader.ImageLoader`.

:class:`ArraySource` holds arrays in memory (e.g. CIFAR-10's ``(50000, 32, 32, 3)``),
:func:`load_npz` reads one, :class:`ImageFolder` reads ``ROOT/<class>/*.png`` (labels: the sorted
class folders) or ``ROOT/*.png`` (no labels), decoded on demand by a thread pool or once with
``.load()``; :func:`open_images` parses the command line's ``--images`` and
:func:`save_image_folder` writes a folder. Every name is re-exported by :mod:`jaxdiff.loader`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArraySource", "ImageFolder", "load_npz", "open_images", "save_image_folder"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras' CIFAR-10 labels are (n, 1)
        labels = labels[:, 0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers, shape ({n},); got {labels.dtype} {labels.shape}"
        )
    if n and labels.min() < 0:
        raise ValueError(f"labels must be >= 0; got {labels.min()}")
    if n and labels.max() > np.iinfo(np.int32).max:  # int32 below would wrap it around
        raise ValueError(f"labels must be < 2**31 (class numbers); got {labels.max()}")
    return labels.astype(np.int32)


class ArraySource:
    """``uint8`` images ``(n, H, W, C)`` (``(n, H, W)`` gets ``C = 1``) and optional labels ``(n,)``
    (or ``(n, 1)``); ``read(indices) -> (images, labels or None)``."""

    def __init__(self, images, labels=None, classes: list[str] | None = None):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(
                f"images must be (n, height, width, channels); got shape {images.shape}"
            )
        if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
            raise ValueError(
                f"images of shape {images.shape} look channels-first; pass "
                "images.transpose(0, 2, 3, 1) (jaxdiff takes (n, height, width, channels))"
            )
        if images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 pixels in 0..255; got {images.dtype} (scale and round: "
                "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in [0, 1])"
            )
        self.images, self.labels = images, _labels(labels, images.shape[0])
        n_cls = 0 if self.labels is None or not len(self.labels) else int(self.labels.max()) + 1
        if classes is not None and len(classes) < n_cls:
            raise ValueError(f"labels go up to {n_cls - 1} but classes names {len(classes)}")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.classes)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The ``uint8`` images at ``indices`` and their labels (``None`` without labels)."""
        labels = None if self.labels is None else self.labels[indices]
        return self.images[indices], labels


def load_npz(path: str | Path, images: str | None = None, labels: str | None = None) -> ArraySource:
    """An :class:`ArraySource` from ``np.savez(path, images=..., labels=...)``; the keys default
    to the first of ``images, x, data, arr_0`` and ``labels, y, label, targets`` present."""
    try:
        f = np.load(path)  # allow_pickle=False: a pickle or a .npy is refused below
    except (ValueError, EOFError) as err:  # a missing file stays a FileNotFoundError
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a .npy array, not a .npz file of named arrays")
    with f:
        keys = list(f.keys())
        img_key = images or next((k for k in ("images", "x", "data", "arr_0") if k in keys), None)
        if img_key not in keys:
            raise ValueError(f"{path} has no images array {images or 'images'!r}; it holds {keys}")
        names = ("labels", "y", "label", "targets") + (("arr_1",) if img_key == "arr_0" else ())
        lab_key = labels or next((k for k in names if k in keys), None)  # np.savez(f, x, y)
        if labels is not None and labels not in keys:
            raise ValueError(f"{path} has no labels array {labels!r}; it holds {keys}")
        return ArraySource(f[img_key], None if lab_key is None else f[lab_key])


def _decode(file: Path, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as img:
        if mode == "L" and img.mode not in _GRAY:  # convert("L") would drop the colours silently
            raise ValueError(
                f"{file} is a {img.mode} image in a folder read as grayscale (its first file is "
                "grayscale); convert the folder to one kind (all RGB or all grayscale)"
            )
        if img.mode.startswith("I"):  # 16-bit grayscale: convert("L") and ("RGB") clip at 255
            wide = np.asarray(img).astype(np.float64)
            arr = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
            if mode == "RGB":
                arr = np.repeat(arr[..., None], 3, axis=-1)
        else:
            arr = np.asarray(img.convert(mode))
    return arr[..., None] if arr.ndim == 2 else arr


_GRAY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # LA: alpha dropped


class ImageFolder:
    """Images under ``root``: ``root/<class>/<file>`` (labels: the class folders in sorted order,
    ``classes``) or ``root/<file>`` (no labels), files with an image extension, sorted. Decoded
    with Pillow on each ``read`` (``threads`` at a time); grayscale files give ``C = 1`` (16-bit
    ones scaled to 8 bits, ``v / 257``), the others RGB (alpha dropped). Every image must have the
    first one's size; a class folder without images is an error (it would shift the labels)."""

    def __init__(self, root: str | Path, *, threads: int = 4):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")

        def images(folder: Path) -> list[Path]:
            found = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            return sorted(p for p in found if p.suffix.lower() in EXTENSIONS)

        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [images(d) for d in dirs]
        top = images(root)
        if top and any(per_class):
            raise ValueError(
                f"{root} holds both image files and class folders; put every image in a class "
                "folder (labelled) or none (unlabelled)"
            )
        if any(per_class):
            empty = [d.name for d, fs in zip(dirs, per_class, strict=True) if not fs]
            if empty:  # dropping it would shift the labels of the folders after it
                raise ValueError(
                    f"class folders without images in {root}: {empty[:4]}; labels are the sorted "
                    "class folders, so remove them or add images"
                )
            self.classes = [d.name for d in dirs]
            self.files = [f for fs in per_class for f in fs]
            self.labels = np.concatenate(
                [np.full(len(fs), i, np.int32) for i, fs in enumerate(per_class)]
            )
        else:
            self.classes, self.files, self.labels = [], top, None
        if not self.files:
            raise ValueError(f"no images ({', '.join(EXTENSIONS)}) in {root} or its subfolders")
        self.root, self.threads = root, threads
        from PIL import Image

        with Image.open(self.files[0]) as img:
            self._mode = "L" if img.mode in _GRAY else "RGB"
        self._shape = _decode(self.files[0], self._mode).shape
        self._check_headers()
        self._pool: ThreadPoolExecutor | None = None

    def _check_headers(self) -> None:
        """Every file opens with the first one's size (and no colour in a grayscale folder),
        from the headers alone (Pillow reads no pixels here): a mis-sized or unreadable file was
        found when a batch first drew it, hours into a run."""
        from PIL import Image, UnidentifiedImageError

        h, w = self._shape[:2]
        for file in self.files[1:]:
            try:
                with Image.open(file) as img:
                    size, mode = img.size, img.mode
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"{file} is not a readable image: {err}") from None
            if size != (w, h):
                raise ValueError(
                    f"{file} is {size[0]}x{size[1]}, not {w}x{h} like {self.files[0].name}; "
                    "resize the folder to one size"
                )
            if self._mode == "L" and mode not in _GRAY:
                raise ValueError(
                    f"{file} is a {mode} image in a folder read as grayscale (its first file is "
                    "grayscale); convert the folder to one kind (all RGB or all grayscale)"
                )

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._shape)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.classes)

    def _one(self, i: int) -> np.ndarray:
        try:  # a truncated file passes the header check and failed hours in, naming no file
            arr = _decode(self.files[i], self._mode)
        except OSError as err:
            raise ValueError(f"{self.files[i]} cannot be decoded ({err})") from None
        if arr.shape != self._shape:
            raise ValueError(
                f"{self.files[i]} is {arr.shape[1]}x{arr.shape[0]}, not {self._shape[1]}x"
                f"{self._shape[0]} like {self.files[0].name}; resize the folder to one size"
            )
        return arr

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The images at ``indices``, decoded (by the thread pool when ``threads > 1``), and their
        labels (``None`` without class folders)."""
        if self.threads > 1 and len(indices) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jaxdiff-decode")
            images = np.stack(list(self._pool.map(self._one, indices)))
        else:
            images = np.stack([self._one(i) for i in indices])
        return images, None if self.labels is None else self.labels[indices]

    def load(self) -> ArraySource:
        """Decode every image once: an :class:`ArraySource` in memory (CIFAR-10: 150 MB)."""
        images, labels = self.read(np.arange(len(self)))
        return ArraySource(images, labels, list(self.classes) or None)


def open_images(spec: str) -> ArraySource | ImageFolder:
    """The source named by ``folder:PATH`` (decoded on demand), ``folder-memory:PATH`` (decoded
    once into memory) or ``npz:PATH`` (the command line's ``--images``)."""
    kind, sep, where = str(spec).partition(":")
    if not sep or kind not in ("folder", "folder-memory", "npz") or not where:
        raise ValueError(
            f"image data must be folder:PATH, folder-memory:PATH or npz:PATH; got {spec!r}"
        )
    if kind == "npz":
        if not Path(where).is_file():
            raise FileNotFoundError(f"npz file {where} does not exist")
        return load_npz(where)
    folder = ImageFolder(where)
    return folder.load() if kind == "folder-memory" else folder


def save_image_folder(
    root: str | Path, images: Any, labels: Any = None, classes: Any = None
) -> Path:
    """Write ``uint8`` images as PNGs: ``root/<class>/<i>.png`` with labels, else ``root/<i>.png``.

    :class:`ImageFolder` numbers the class folders in sorted order, so the folders must sort in
    label order: default names are zero-padded (``00``, ``01``, ..., ``11``: ``10`` sorted before
    ``2``), names given in ``classes`` must be sorted already, and every class up to the largest
    label needs an image (a class without one would shift the labels after it)."""
    from PIL import Image

    root = Path(root)
    src = ArraySource(images, labels, classes)
    names = src.classes
    if src.labels is not None:
        if classes is None:
            width = len(str(len(names) - 1))
            names = [f"{i:0{width}d}" for i in range(len(names))]
        elif list(names) != sorted(names):
            raise ValueError(
                f"class names must sort in label order (ImageFolder reads the sorted folders); "
                f"got {list(names)[:6]}: prefix them with the label, e.g. '{0:02d}_{names[0]}'"
            )
        present = np.unique(np.asarray(src.labels))
        missing = sorted(set(range(int(present.max()) + 1)) - set(present.tolist()))
        if missing:
            raise ValueError(
                f"classes {missing[:6]} have no image: ImageFolder would give the classes after "
                "them lower labels; save a set with every class"
            )
    for i in range(len(src)):
        folder = root if src.labels is None else root / names[src.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        img = src.images[i]
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return root
