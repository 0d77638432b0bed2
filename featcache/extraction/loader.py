"""The image loader: decode and preprocess in worker processes, batches of stacked tensors, and the views."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from featcache.data.images import Preprocess, apply_view
from featcache.data.sources import ImageRecord
from featcache.extraction.device import Accelerator
from featcache.extraction.engines import Forward
from featcache.extraction.resume import read_item


class _ImageDataset(Dataset):
    """Reads, hashes, decodes and resizes one image; failures come back as a reason string."""

    def __init__(self, records: list[ImageRecord], preprocess: Preprocess):
        self.records, self.preprocess = records, preprocess
        self._npz: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return read_item(self.records[i], i, self.prepare, self._npz)

    def prepare(self, content: bytes | np.ndarray) -> torch.Tensor:
        """The decoded, resized image (raises ``ValueError`` for content that is not an image)."""
        return self.preprocess.load(content)


def _collate(items: list[dict]) -> dict:
    ok = [it for it in items if it["image"] is not None]
    images = torch.stack([it["image"] for it in ok]) if ok else None
    # Only the stacked batch crosses to the main process: each tensor left in the items would cost
    # its own shared-memory handshake (a socket connect per image, 20 % of the main process's time).
    items = [{**it, "image": None} for it in items]
    return {"items": items, "images": images, "ok": [it["index"] for it in ok]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the backbone's threads
    # A worker hands its batch over through multiprocessing's fd-sharing thread; when the main process
    # is interrupted mid-handshake, that thread in the worker prints a ConnectionResetError traceback
    # under the clean "Interrupted" message (seen in CI). The main process alone reports errors.
    _quiet_worker_teardown()


def _views_axis(outs: list[dict[str, torch.Tensor]], pool: str) -> torch.Tensor:
    """(batch, dim) for one view; (batch, views, dim) for several."""
    return outs[0][pool] if len(outs) == 1 else torch.stack([o[pool] for o in outs], dim=1)


def _quiet_worker_teardown() -> None:
    """After Ctrl-C the loader's workers die mid-handshake with multiprocessing's fd-sharing thread,
    which then prints a ConnectionResetError traceback under the clean "Interrupted" message (seen
    under load, on either side of the handshake). Connection errors are expected at that point: they
    alone are silenced, from then on (in a worker, from its start: its only peer is the main process)."""
    previous = sys.excepthook
    if getattr(previous, "featcache_quiet_teardown", False):  # already installed by an earlier interrupt
        return

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)

    hook.featcache_quiet_teardown = True
    sys.excepthook = hook


def run_views(forward: Forward, images: torch.Tensor, view_names: tuple[str, ...],
              accelerator: Accelerator) -> dict[str, np.ndarray]:
    """Every view of a batch of uint8 images through ``forward`` on the accelerator's device (one forward per view,
    at the batch size measured best): ``{pool: (n, views, dim) float32}``."""
    images = accelerator.to_device(images)
    outs = []
    with torch.inference_mode():
        for view in view_names:
            with accelerator.autocast():
                outs.append(forward(apply_view(images, view)))  # uint8: the forward normalises
    return {p: _views_axis(outs, p).float().cpu().numpy() for p in outs[0]}
