"""Scale-out on a Ray cluster (``--ray local|auto|ADDRESS``): the same store, fingerprints and guarantees.

- **Extraction**: Ray Data reads, hashes and decodes the images in CPU tasks (the same code as the local
  DataLoader workers), a pool of backbone actors runs the model (one GPU each with ``num_gpus``, or CPU
  actors), and the driver commits what comes back through the local path's shard writer: atomic shards,
  resume, the entry lock and failed-image records are the local ones. Ray Data restarts a killed actor
  and retries its batch; rows are keyed by image id, so a retried batch is never stored twice, and a
  killed driver leaves only whole shards behind.
- **Heads**: every fold and the final refit of a head are Ray tasks, with the local path's seeds and one
  thread each, so the scores are the local ones.

Every node must see the images (and, for ``--weights FILE`` or the ONNX engines, the cache) at the same
paths: a shared file system. A node that does not is named in the error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featcache.errors import FeatcacheError

LOCAL = "local"
ROWS_PER_BLOCK = 64
DECODE_CPUS = 0.5  # what Ray reserves per decode task: reading and decoding a JPEG is light next to the forward


@dataclass
class RayCluster:
    """A connection to a Ray cluster: ``local`` starts one on this machine for the run, ``auto`` joins the
    one running here (``ray start --head``), anything else is a cluster address (``ray://host:10001``)."""

    address: str = LOCAL
    actors: int | None = None  # backbone actors (default: one per GPU, else 1)
    actor_cpus: float = 1.0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            import ray
        except ImportError:
            raise FeatcacheError("--ray needs Ray: pip install 'featcache[ray]'") from None
        if not ray.is_initialized():
            if self.address not in (LOCAL, "auto"):
                from featcache.net import reachable

                reachable(self.address, "--ray", "start a cluster with `ray start --head` and give its address, "
                          "or use --ray local")
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            try:
                if self.address == LOCAL:
                    ray.init(num_cpus=os.cpu_count(), **kwargs)
                else:
                    ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise FeatcacheError(
                    f"--ray {self.address}: cannot connect ({str(exc).splitlines()[0][:160]}); start a cluster with "
                    "`ray start --head`, give its address, or use --ray local") from None
        import ray.data

        # featcache shows its own progress bar; Ray Data's bars and execution logs would interleave with it
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.info = {"ray": ray.__version__, "address": self.address, "nodes": len(nodes),
                     "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}

    def device(self, device: str) -> torch.device:
        """Where the actors run the model: ``auto`` is CUDA when the cluster has GPUs (one actor each)."""
        if device == "cpu":
            return torch.device("cpu")
        if device == "auto":
            return torch.device("cuda" if self.info["gpus"] else "cpu")
        if device != "cuda":  # cuda:N names a GPU of this machine; on a cluster Ray gives each actor its own
            raise FeatcacheError(f"--device {device}: on a Ray cluster each backbone actor gets its own GPU; "
                                 "use --device cuda (or auto)")
        if not self.info["gpus"]:
            raise FeatcacheError(f"--device {device}: the Ray cluster ({self.address}) has no GPUs; "
                                 "use --device cpu (or auto)")
        return torch.device("cuda")

    @staticmethod
    def precision(precision: str, device: torch.device) -> str:
        """The autocast precision of GPU actors (part of the fingerprint, so fixed here, not per node):
        ``auto`` is bf16, which every GPU of Ray's usual fleets (A100, H100, L4) supports."""
        if device.type != "cuda":
            return "fp32"
        return "bf16" if precision == "auto" else precision

    def describe(self) -> str:
        return (f"Ray {self.info['ray']} ({self.address}): {self.info['nodes']} node(s), "
                f"{self.info['cpus']:g} CPUs, {self.info['gpus']:g} GPUs")

    # -- extraction -------------------------------------------------------------------------------------

    def extract_batches(self, todo: list, model, view_names: tuple[str, ...], engine: str, cache_root: Path,
                        batch_size: int | None, device: torch.device, precision: str,
                        ) -> Iterator[tuple[list[dict], dict[str, np.ndarray]]]:
        """(items, features) per batch, as the local loader yields them (see ``extract._local_batches``)."""
        import ray.data

        gpus = self.info["gpus"] if device.type == "cuda" else 0
        actors = self.actors or max(1, int(gpus))  # one per GPU; on CPUs one unless asked
        batch_size = batch_size or (128 if gpus else 8)
        rows = [{"index": i, "id": r.id, "path": str(r.path),
                 "npz_key": "" if r.npz_key is None else f"{r.npz_key[0]}\x1f{r.npz_key[1]}"}
                for i, r in enumerate(todo)]
        _check_paths_visible(todo)
        loader = {"name": model.spec.name, "weights": _weights_arg(model), "pools": tuple(model.model.pools),
                  "weights_sha256": model.weights_sha256, "preprocess": model.preprocess.to_dict(),
                  "views": view_names, "engine": engine, "cache_root": str(cache_root), "precision": precision,
                  "gpu": bool(gpus), "threads": max(1, int(self.actor_cpus)), "batch_size": batch_size}
        # Actors that reserved every CPU would leave none to the decode tasks, and the pipeline would wait
        # forever (seen: 2 one-CPU actors on 2 cores): the actors share what the decode does not need.
        actor_cpus = min(self.actor_cpus, max(0.1, (self.info["cpus"] - DECODE_CPUS) / actors))
        # Blocks of whole local batches (about 64 images: Ray Data costs ~0.1 s per block here), each handed
        # to a task or actor whole and forwarded batch by batch: the actors see exactly the batches the
        # local loader makes, so the features are the same bytes (CPU kernels may sum in another order for
        # another batch composition).
        import pandas as pd

        per_block = batch_size * max(1, ROWS_PER_BLOCK // batch_size)
        blocks = [pd.DataFrame(rows[start:start + per_block]) for start in range(0, len(rows), per_block)]
        decoded = ray.data.from_pandas(blocks).map_batches(
            _decode_batch, batch_size=None, batch_format="numpy", fn_kwargs={"preprocess": model.preprocess.to_dict()},
            num_cpus=DECODE_CPUS)
        features = decoded.map_batches(
            BackboneActor, batch_size=None, batch_format="numpy", fn_constructor_kwargs={"loader": loader},
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus, num_gpus=1 if gpus else 0)
        pools = tuple(model.model.pools)
        try:
            for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
                yield _items_and_features(batch, pools)
        except Exception as exc:  # a task's own FeatcacheError comes back wrapped: say it plainly
            cause = _featcache_cause(exc)
            if cause is not None:
                raise cause from None
            raise

    # -- heads --------------------------------------------------------------------------------------------

    def run_tasks(self, function: Callable, shared: tuple, calls: list[tuple]) -> list:
        """``function(*shared, *call)`` for every call as Ray tasks of one CPU; ``shared`` (the feature
        matrix, labels, groups) goes into the object store once."""
        import ray

        remote = ray.remote(num_cpus=1, max_retries=3)(function)
        shared_refs = [ray.put(value) for value in shared]
        return ray.get([remote.remote(*shared_refs, *call) for call in calls])


def _weights_arg(model) -> str | None:
    origin = model.weights_origin
    if origin.startswith("file:"):
        return origin.split(" ")[0][5:]
    return "random" if origin.startswith("random") else None


def _check_paths_visible(todo: list) -> None:
    """Every node must read the images at the driver's paths: ask each alive node, name those that cannot."""
    import ray

    folder = os.path.commonpath([str(Path(r.path).parent) for r in todo])  # the images' common root
    probes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        probes.append((node.get("NodeManagerAddress", node["NodeID"]),
                       ray.remote(num_cpus=0)(os.path.isdir).options(scheduling_strategy=strategy).remote(folder)))
    blind = [address for address, probe in probes if not ray.get(probe)]
    if blind:
        raise FeatcacheError(f"--ray: node(s) {', '.join(blind)} cannot see {folder}; every node must mount the "
                             "images (and the cache) at the same path: a shared file system (NFS, Lustre, a "
                             "mounted bucket). See docs/scale.md")


def _record(row: dict):
    from featcache.data.sources import ImageRecord

    key = str(row["npz_key"])
    npz_key = None if not key else (key.split("\x1f")[0], int(key.split("\x1f")[1]))
    return ImageRecord(str(row["id"]), Path(str(row["path"])), npz_key=npz_key)


def _decode_batch(batch: dict[str, np.ndarray], preprocess: dict) -> dict[str, np.ndarray]:
    """Read, hash and decode with the local loader's own code; failed images keep their row (with the reason)."""
    from featcache.data.images import Preprocess
    from featcache.extraction.loader import _ImageDataset

    torch.set_num_threads(1)
    records = [_record({k: batch[k][i] for k in batch}) for i in range(len(batch["index"]))]
    dataset = _ImageDataset(records, Preprocess(**{**preprocess, "mean": tuple(preprocess["mean"]),
                                                   "std": tuple(preprocess["std"])}))
    items = [dataset[i] for i in range(len(records))]
    blank = np.zeros((3, preprocess["crop_size"], preprocess["crop_size"]), np.uint8)  # a failed image's row
    images = np.stack([it["image"].numpy() if it["image"] is not None else blank for it in items])
    return {"index": batch["index"], "sha": np.array([it["sha"] for it in items], dtype=object),
            "size": np.array([it["size"] for it in items], np.int64),
            "mtime": np.array([it["mtime"] for it in items], np.int64),
            "error": np.array([it["error"] or "" for it in items], dtype=object), "image": images}


class BackboneActor:
    """One loaded backbone per actor (per GPU, or per CPU slot); restarted by Ray Data if its process dies."""

    def __init__(self, loader: dict):
        from featcache.backbones.models import load_backbone
        from featcache.data.images import Preprocess
        from featcache.extraction.engines import make_forward

        self.device = torch.device("cuda" if loader["gpu"] else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(loader["threads"])  # the CPUs Ray reserved for this actor
        model = load_backbone(loader["name"], weights=loader["weights"], pools=loader["pools"], device=self.device)
        if model.weights_sha256 != loader["weights_sha256"]:
            raise FeatcacheError(f"{loader['name']} on this node has other weights ({model.weights_sha256[:12]}) "
                                 f"than the driver's ({loader['weights_sha256'][:12]}); install the same weights")
        pre = loader["preprocess"]
        model.preprocess = Preprocess(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
        if model.spec.is_cnn and loader["engine"] == "torch":
            model.model.to(memory_format=torch.channels_last)
        self.model, self.loader = model, loader
        self.forward = make_forward(loader["engine"], model, Path(loader["cache_root"]))

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from featcache.extraction.device import Accelerator
        from featcache.extraction.engines import run_pipelined
        from featcache.extraction.loader import run_views

        ok = np.array([not e for e in block["error"]], bool)
        out = {k: block[k] for k in ("index", "sha", "size", "mtime", "error")}
        views, dims = len(self.loader["views"]), self.model.dims
        shape = (views,) if views > 1 else ()  # one view is stored without the views axis
        feats = {p: np.zeros((len(ok), *shape, dims[p]), np.float32) for p in self.loader["pools"]}
        size = self.loader["batch_size"]
        # the local loader's batches: its decoded images, in order (several at once on a multi-stream engine)
        batches = [rows for start in range(0, len(ok), size)
                   if len(rows := np.flatnonzero(ok[start:start + size]) + start)]

        def compute(rows: np.ndarray) -> dict[str, np.ndarray]:
            images = torch.from_numpy(np.ascontiguousarray(block["image"][rows]))
            return run_views(self.forward, images, tuple(self.loader["views"]),
                             Accelerator(self.device, self.loader["precision"]))

        for rows, computed in run_pipelined(self.forward, batches, compute):
            for p in feats:
                feats[p][rows] = computed[p]
        return {**out, **{f"feat:{p}": v for p, v in feats.items()}}


def _items_and_features(batch: dict[str, np.ndarray], pools: tuple[str, ...]) -> tuple[list[dict], dict]:
    items = [{"index": int(batch["index"][i]), "sha": str(batch["sha"][i]), "size": int(batch["size"][i]),
              "mtime": int(batch["mtime"][i]), "error": str(batch["error"][i]) or None}
             for i in range(len(batch["index"]))]
    ok = np.array([not it["error"] for it in items], bool)
    return items, {p: np.asarray(batch[f"feat:{p}"])[ok] for p in pools}


def _featcache_cause(exc: BaseException) -> FeatcacheError | None:
    seen = exc
    for _ in range(10):
        if isinstance(seen, FeatcacheError):
            return seen
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None:
            return None
        seen = cause
    return None
