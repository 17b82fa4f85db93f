"""Fashion-MNIST from IDX files: find them, verify them, cache the decoded arrays, hold them as device tensors.

Where the files come from, in order: `data.root` (raw `*-ubyte` / `*-ubyte.gz`, or torchvision's
`FashionMNIST/raw/` layout), then `data.system_dir` (Debian/Ubuntu package `dataset-fashion-mnist`), then
torchvision's download into `data.root` when `data.download` is true.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

FILES = {  # part -> (file stem, IDX magic, rank)
    "train_images": ("train-images-idx3-ubyte", 0x0803, 3),
    "train_labels": ("train-labels-idx1-ubyte", 0x0801, 1),
    "test_images": ("t10k-images-idx3-ubyte", 0x0803, 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x0801, 1),
}
# SHA-256 of the *decompressed* official files: distributors recompress the .gz, so only the content is stable.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
OFFICIAL_COUNT = {"train": 60000, "t10k": 10000}
CACHE_VERSION = 1


class DataError(RuntimeError):
    """The data set is missing or damaged; the message names the file or places and says what to do."""


def read_idx(path: Path, magic: int, rank: int) -> tuple[np.ndarray, str]:
    """Decode one IDX file (raw or .gz) after checking magic, shape and length; returns (array, sha256)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e}); delete it or replace it with a good copy")
    if len(raw) < 4 + 4 * rank:
        raise DataError(f"{path}: truncated ({len(raw)} bytes, no full IDX header); delete it and fetch it again")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x}); "
                        "this is not the right file: delete it or replace it with a good copy")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    if rank == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28; replace it with a good copy")
    body = raw[4 + 4 * rank:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or padded ({len(body)} data bytes, header says {int(np.prod(dims))}); "
                        "delete it and fetch it again")
    stem = path.name.removesuffix(".gz")
    digest = hashlib.sha256(raw).hexdigest()
    if dims[0] == OFFICIAL_COUNT[stem.split("-")[0]] and digest != SHA256[stem]:
        raise DataError(f"{path}: checksum mismatch (sha256 of the decompressed file is {digest[:12]}…); "
                        "the file is corrupt: delete it and fetch it again")
    array = np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()  # writable, for torch.from_numpy
    if rank == 1 and array.size and array.max() > 9:
        raise DataError(f"{path}: label {int(array.max())} out of range 0..9; replace it with a good copy")
    return array, digest


def _complete_set(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (each raw or .gz), or None if any is missing."""
    found = {}
    for part, (stem, _, _) in FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found[part] = hit
    return found


def _say_what_was_passed_over(skipped: list[Path], used: Path) -> None:
    """A folder before `used` that holds some of the four files but not all (a partial copy, a download cut short)
    is a warning: the run would otherwise train on another copy without a word."""
    for folder in skipped:
        have = [stem for stem, _, _ in FILES.values() if (folder / stem).is_file() or (folder / f"{stem}.gz").is_file()]
        if have:
            missing = [stem for stem, _, _ in FILES.values() if stem not in have]
            log.warning("%s holds %d of the 4 Fashion-MNIST files (missing %s): using the complete set in %s",
                        folder, len(have), ", ".join(missing), used)


def locate(root: Path, system_dir: Path, download: bool) -> dict[str, Path]:
    """Find the four files in the documented order, downloading as the last resort."""
    places = [root, root / "FashionMNIST" / "raw", system_dir]
    for place in places:
        files = _complete_set(place)
        if files:
            _say_what_was_passed_over(places[:places.index(place)], place)
            return files
    failure = ""
    if download:
        try:
            from torchvision.datasets import FashionMNIST
            log.info("Fashion-MNIST not found locally: downloading into %s", root)
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
            files = _complete_set(root / "FashionMNIST" / "raw")
            if files:
                return files
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError variants
            failure = f" (the download failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})"
    tried = ", ".join(str(p) for p in places) + (", torchvision download" if download else "")
    last = "or retry where the internet is reachable" if download else "or set data.download=true"
    raise DataError(f"Fashion-MNIST not found (tried {tried}){failure}: install it with "
                    "'apt-get install -y dataset-fashion-mnist', or put the four IDX files in "
                    f"data.root={root}, {last}")


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file whole or not at all: `write` fills a uniquely named temporary file beside it, which is then
    renamed over it. A crash never leaves half a file, and writers of the same file at once each rename a whole
    one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        try:
            write(f)
        except BaseException:  # a full disk, a second Ctrl-C inside torch.save: no temporary file left beside it
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def load_arrays(root: Path, system_dir: Path, download: bool, cache: bool) -> tuple[dict[str, np.ndarray], str, str]:
    """The four decoded uint8 arrays, a digest of their content and their folder; cached while the files are
    unchanged."""
    files = locate(root, system_dir, download)
    source = str(files["train_images"].parent.resolve())
    stamp = {part: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for part, p in files.items()}
    cache_dir = root / "cache"
    meta_path = cache_dir / "meta.json"
    if cache and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("version") == CACHE_VERSION and meta.get("stamp") == stamp:
                arrays = {part: np.load(cache_dir / f"{part}.npy") for part in FILES}
                return arrays, meta["digest"], source
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache is rebuilt from the verified files below
    arrays, digests = {}, []
    for part, path in files.items():
        arrays[part], d = read_idx(path, *FILES[part][1:])
        digests.append(d)
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"{files[split + '_images']} and {files[split + '_labels']} disagree on the number of "
                            "examples; replace them with a matching pair")
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    if cache:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # jobs starting together read the cache while others write it: each file whole or not at all
            for part, a in arrays.items():
                write_atomic(cache_dir / f"{part}.npy", lambda f: np.save(f, a))
            meta = {"version": CACHE_VERSION, "stamp": stamp, "digest": digest}
            write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        except OSError as e:
            log.warning("could not write the data cache in %s (%s); start-up will decode again", cache_dir, e)
    return arrays, digest, source


@dataclass
class FashionMNIST:
    """Train/valid/test tensors on one device: images uint8 (N, 1, 28, 28) as stored (a quarter of float32's
    memory; `pixels` turns a batch into the model's float input), labels int64."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    digest: str
    source: str

    def split_sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "valid": len(self.valid_y), "test": len(self.test_y)}


def load(root: str | Path, system_dir: str | Path, download: bool, valid_size: int, split_seed: int,
         device: torch.device, cache: bool = True) -> FashionMNIST:
    """Load, verify and split the data set onto `device`; the split depends on `split_seed` only."""
    root, system_dir = Path(root), Path(system_dir)
    arrays, digest, source = load_arrays(root, system_dir, download, cache)
    n = len(arrays["train_labels"])
    if not 0 < valid_size < n:
        raise DataError(f"data.valid_size={valid_size} must be between 1 and {n - 1} (the training set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    train_idx, valid_idx = perm[: n - valid_size], perm[n - valid_size:]  # like random_split([n - v, v])

    def images(a: np.ndarray, idx: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.from_numpy(a)
        t = t[idx] if idx is not None else t
        return t.to(device).unsqueeze(1)

    def labels(a: np.ndarray, idx: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.from_numpy(a.astype(np.int64))
        return (t[idx] if idx is not None else t).to(device)

    return FashionMNIST(
        train_x=images(arrays["train_images"], train_idx), train_y=labels(arrays["train_labels"], train_idx),
        valid_x=images(arrays["train_images"], valid_idx), valid_y=labels(arrays["train_labels"], valid_idx),
        test_x=images(arrays["test_images"]), test_y=labels(arrays["test_labels"]),
        digest=digest, source=source,
    )


def pixels(x: torch.Tensor) -> torch.Tensor:
    """A batch of stored uint8 images as the model's input: float32 in [0, 1] (float input passes through)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def example_input(images, n: int = 2) -> np.ndarray:
    """The first n stored uint8 images (an array or a tensor on any device) as the float32 array a logged MLflow
    model takes: (n, 1, 28, 28) in [0, 1]."""
    return pixels(torch.as_tensor(images[:n]).cpu().reshape(-1, 1, 28, 28)).numpy()


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of one epoch's training batches: full ones, then the remainder as a last partial batch (DataLoader's
    drop_last=False), except a remainder of one example, which is left out of that epoch: BatchNorm cannot
    normalise a batch of one, and the shuffle puts a different example there every epoch."""
    sizes = [batch_size] * (n // batch_size)
    if n % batch_size > 1 or (n % batch_size == 1 and not sizes):
        sizes.append(n % batch_size)
    return sizes


def orders(n: int, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """One epoch's shuffled order of 0..n-1 per job, shape (K, n), batched by `batch_sizes`. Drawn on the CPU from
    each job's own generator, so a job's order and its checkpointed generator state are the same on any device."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
