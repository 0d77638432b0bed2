"""The feature store: fingerprinted cache entries made of atomically committed HDF5 shards.

Layout: ``<cache>/<dataset>/<backbone>-<fingerprint>/`` holding ``shard-00000.h5 …``,
``manifest.json`` (a summary, rebuilt from the shards) and ``.lock``. A shard is written under a
hidden temporary name and renamed into place only when complete, so a killed run leaves nothing a
later run could take for finished work. Shards are the truth: each lists the images it covers,
with their SHA-256, size and mtime, and the ones that failed with the reason."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import io
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featcache.errors import CacheError, EntryLocked
from featcache.store.hashing import bytes_hash
from featcache.store.naming import NORM_STATS_PREFIX

SHARD_GLOB = "shard-*.h5"


TEMP_MARK = ".tmp-"


MANIFEST = "manifest.json"


STR = h5py.string_dtype("utf-8")


# What a shard records of its entry, so that a lost manifest.json can be rebuilt from the shards.
ENTRY_KEYS = ("fingerprint", "fingerprint_inputs", "format_version", "dataset", "source", "source_kind",
              "backbone", "pools", "dims", "dtype", "views")


def read_norm_stats(cache_root: Path, dataset: str, preprocess: dict | None = None) -> list[dict]:
    """The dataset-norm statistics stored for ``dataset`` (only those computed with ``preprocess``, the
    preprocessing without mean and std, when given), newest first."""
    found = []
    for path in Path(cache_root, dataset).glob(f"{NORM_STATS_PREFIX}*.json"):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a torn file is recomputed, never trusted
        if preprocess is None or stats.get("preprocess") == preprocess:
            found.append({**stats, "path": str(path)})
    return sorted(found, key=lambda s: s.get("date", ""), reverse=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it: a reader sees all or nothing."""
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EntryLock:
    """Exclusive lock on an entry (POSIX ``lockf``: released by the kernel even after SIGKILL).

    Not ``flock``: a flock is shared with forked DataLoader workers, so an orphaned worker of a
    killed run would keep the entry locked; a POSIX lock belongs to the process alone.

    The holder writes its pid, host, start time and command into ``.lock`` so that a refused run
    can say who holds it. On a file system without POSIX locks (some network and FUSE mounts),
    the lock is the existence of ``.lock.held``, made with O_EXCL: a holder that died on this
    host is detected by its pid and cleared; one from another host needs ``break_lock=True``
    (``--break-lock``) once the user has checked that it is gone.
    """

    NO_POSIX_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

    def __init__(self, entry_dir: Path, break_lock: bool = False):
        self.path = entry_dir / ".lock"
        self.held_path = entry_dir / ".lock.held"
        self.break_lock = break_lock
        self._fd: int | None = None
        self._held_file = False

    @staticmethod
    def _holder_info() -> str:
        return (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{_dt.datetime.now().isoformat(timespec='seconds')} ({' '.join(sys.argv[:3])})")

    def __enter__(self) -> EntryLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheError(f"cannot write to the cache entry {self.path.parent} ({exc.strerror}); "
                             "use --cache (or $FEATCACHE_CACHE) to pick a writable folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in self.NO_POSIX_LOCKS:
                os.close(fd)
                self._take_held_file()
                return self
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EntryLocked(
                f"{self.path.parent} is being written by {holder}; wait for it to finish or stop "
                "it (a second run would only redo its work)") from None
        os.ftruncate(fd, 0)
        os.write(fd, self._holder_info().encode())
        self._fd = fd
        return self

    def _take_held_file(self) -> None:
        """Fallback lock for file systems without POSIX locks: an O_EXCL file naming its holder."""
        for _attempt in range(2):
            try:
                fd = os.open(self.held_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.held_path.read_text(errors="replace").strip()
                if self.break_lock or _holder_is_dead(holder):
                    self.held_path.unlink(missing_ok=True)
                    continue
                raise EntryLocked(
                    f"{self.path.parent} is locked by {holder or 'an unknown process'} (this file system "
                    "has no POSIX locks); if that process is gone, rerun with --break-lock") from None
            os.write(fd, self._holder_info().encode())
            os.close(fd)
            self._held_file = True
            return
        raise EntryLocked(f"{self.path.parent}: could not take the lock file {self.held_path}")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._held_file:
            self.held_path.unlink(missing_ok=True)
            self._held_file = False


def _holder_is_dead(holder: str) -> bool:
    """True only when ``holder`` ("pid N on HOST since ...") names a process of this host that is gone."""
    parts = holder.split()
    if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def row_shape(views: int, dim: int, n: int) -> tuple[int, ...]:
    """The shape of ``n`` rows of features: ``(n, dim)``, or ``(n, views, dim)`` with several views."""
    return (n, views, dim) if views > 1 else (n, dim)


@dataclass
class ShardRows:
    """What one shard commits: extracted rows and failed rows, both in source order."""

    pools: tuple[str, ...]
    views: int = 1  # > 1: each row's features are (views, dim)
    ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    failed: list[tuple[str, str, int, int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids) + len(self.failed)

    def add(self, image_id: str, sha: str, size: int, mtime: int, feats: dict[str, np.ndarray]) -> None:
        self.ids.append(image_id)
        self.sha256.append(sha)
        self.size.append(size)
        self.mtime_ns.append(mtime)
        for pool in self.pools:
            self.features.setdefault(pool, []).append(feats[pool])

    def add_failed(self, image_id: str, sha: str, size: int, mtime: int, reason: str) -> None:
        self.failed.append((image_id, sha, size, mtime, reason))


def write_shard(entry_dir: Path, index: int, rows: ShardRows, dims: dict[str, int], dtype: str,
                attrs: dict) -> Path:
    """Write ``rows`` as ``shard-<index>.h5`` atomically (temp file, fsync, rename)."""
    final = entry_dir / f"shard-{index:05d}.h5"
    tmp = entry_dir / f".{final.name}{TEMP_MARK}{os.getpid()}"
    image = _shard_image(rows, dims, dtype, attrs)
    try:
        with open(tmp, "wb") as handle:
            handle.write(image)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(entry_dir)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def _shard_image(rows: ShardRows, dims: dict[str, int], dtype: str, attrs: dict) -> bytes:
    """The shard's HDF5 file, built in memory.

    HDF5 never touches the disk itself: after a failed write (disk full) h5py leaves the file in a
    state that crashes the interpreter later (seen with a full tmpfs). A plain write + fsync of
    the finished bytes turns a full disk into an ordinary OSError instead.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("ids", data=np.array(rows.ids, dtype=object), dtype=STR)
        h5.create_dataset("sha256", data=np.array(rows.sha256, dtype="S64").reshape(-1))
        h5.create_dataset("size", data=np.array(rows.size, dtype=np.int64))
        h5.create_dataset("mtime_ns", data=np.array(rows.mtime_ns, dtype=np.int64))
        group = h5.create_group("features")
        checksums = {}
        for pool in rows.pools:
            stacked = (np.stack(rows.features[pool]) if rows.ids
                       else np.zeros(row_shape(rows.views, dims[pool], 0))).astype(dtype)
            group.create_dataset(pool, data=stacked)  # contiguous: mmap-able
            checksums[pool] = bytes_hash(stacked)
        h5.attrs["features_sha256"] = json.dumps(checksums, sort_keys=True)
        failed = h5.create_group("failed")
        columns = list(zip(*rows.failed, strict=True)) if rows.failed else [[], [], [], [], []]
        failed.create_dataset("ids", data=np.array(columns[0], dtype=object), dtype=STR)
        failed.create_dataset("sha256", data=np.array(columns[1], dtype="S64").reshape(-1))
        failed.create_dataset("size", data=np.array(columns[2], dtype=np.int64))
        failed.create_dataset("mtime_ns", data=np.array(columns[3], dtype=np.int64))
        failed.create_dataset("reason", data=np.array(columns[4], dtype=object), dtype=STR)
        for key, value in attrs.items():
            h5.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    return buffer.getvalue()


def open_shard(shard: Path) -> h5py.File:
    """Open a committed shard for reading; a damaged one is a :class:`CacheError` saying what to run."""
    try:
        return h5py.File(shard, "r")
    except OSError as exc:
        raise CacheError(f"{shard} cannot be read ({exc}); run `featcache verify --repair "
                         f"{shard.parent}` to drop it, then rerun extract to redo its images") from None


def remove_temporaries(entry_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted writes; call only while holding the entry lock."""
    leftovers = [p for p in entry_dir.glob(f".*{TEMP_MARK}*") if p.is_file()]
    for path in leftovers:
        path.unlink()
    return leftovers


@dataclass(frozen=True)
class ImageState:
    """What the store knows of one image: enough to tell whether the file changed since."""

    sha256: str
    size: int
    mtime_ns: int
    failed: str | None  # the reason, for images that could not be extracted
    shard: int
    row: int


class CacheEntry:
    """Read side of one entry. Ids are served in entry order (the order they were extracted)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise CacheError(f"{self.path}: not a cache entry (no {MANIFEST}); "
                             "run `featcache extract` to create it")
        try:
            self.manifest: dict = json.loads(manifest.read_text())
            self.manifest["fingerprint"], self.manifest["fingerprint_inputs"]  # noqa: B018 - must be there
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{manifest} is damaged ({type(exc).__name__}: {exc}); run `featcache verify --repair "
                             f"{self.path}`: it rebuilds the manifest from the shards (runs are kept)") from None
        except OSError as exc:
            raise CacheError(f"{manifest} cannot be read ({exc.strerror or exc}); check its permissions") from None
        self._state: dict[str, ImageState] | None = None
        self._checked: set[tuple[Path, str]] = set()  # (shard, pool) whose checksum was verified

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def _facts(self) -> list[tuple[str, str]]:
        m = self.manifest
        state = self.state() if self.shard_paths() else {}
        failed = sum(1 for s in state.values() if s.failed is not None)
        return [("backbone", m["backbone"]), ("dataset", m["dataset"]),
                ("images", f"{len(state) - failed}" + (f" ({failed} failed)" if failed else "")
                 + ("" if m.get("complete", True) else ", incomplete")),
                ("poolings", ", ".join(f"{p} ({m.get('dims', {}).get(p, '?')})" for p in self.pools)),
                ("views", str(self.views)), ("fingerprint", self.fingerprint), ("folder", str(self.path))]

    def __repr__(self) -> str:
        return "Entry(" + ", ".join(f"{k}={v}" for k, v in self._facts()) + ")"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{html.escape(v)}</td>"
                       "</tr>" for k, v in self._facts())
        return f"<table><caption>featcache entry</caption>{rows}</table>"

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(self.manifest["pools"])

    @property
    def views(self) -> int:
        """Views per image (1 unless extracted with --views); features are then (n, views, dim)."""
        return len(self.manifest.get("views", ["identity"]))

    @property
    def resize_mode(self) -> str:
        """The --resize the entry was extracted with (entries from before the option are ``crop``)."""
        return self.manifest["fingerprint_inputs"]["preprocess"].get("resize_mode", "crop")

    @property
    def filters(self) -> tuple[str, ...]:
        """The --preprocess filters the entry was extracted with (none for entries before the option)."""
        return tuple(self.manifest["fingerprint_inputs"]["preprocess"].get("filters", ()))

    @property
    def engine(self) -> str:
        """What ran the backbone (entries from before --engine are ``torch``)."""
        return self.manifest["fingerprint_inputs"].get("engine", "torch")

    @property
    def resampler(self) -> str:
        """The --resampler the entry was extracted with (entries from before the option are ``pil``)."""
        return self.manifest["fingerprint_inputs"]["preprocess"].get("resampler", "pil")

    @property
    def settings(self) -> dict:
        """The extraction settings that set this entry's features apart from another entry of the same
        backbone and images (what ``fit`` selects by and ``compare`` labels by), each under its option's name."""
        return {"views": self.views, "resize": self.resize_mode, "preprocess": self.filters,
                "engine": self.engine, "resampler": self.resampler,
                "precision": self.manifest["fingerprint_inputs"].get("precision", "fp32"),
                "own": {"resize": "crop", "resampler": "pil", **self.manifest.get("backbone_preprocess", {})}}

    def shard_paths(self) -> list[Path]:
        return sorted(self.path.glob(SHARD_GLOB))

    def state(self) -> dict[str, ImageState]:
        """id -> :class:`ImageState`; a later shard overrides an earlier one for the same id."""
        if self._state is None:
            state: dict[str, ImageState] = {}
            for shard_no, shard in enumerate(self.shard_paths()):
                try:
                    _read_shard_index(shard, shard_no, state)
                except (KeyError, ValueError, OSError) as exc:
                    raise CacheError(f"{shard} is damaged ({exc}); run `featcache verify --repair "
                                     f"{self.path}` to drop it, then rerun extract") from None
            self._state = state
        return self._state

    @property
    def ids(self) -> list[str]:
        return [i for i, s in self.state().items() if s.failed is None]

    @property
    def failed(self) -> dict[str, str]:
        return {i: s.failed for i, s in self.state().items() if s.failed is not None}

    def read(self, pool: str, ids: list[str] | None = None, dtype: str = "float32") -> np.ndarray:
        """Features of ``ids`` (default: all, entry order) as one array, read shard by shard."""
        self._check_pool(pool)
        state = self.state()
        wanted = self.ids if ids is None else list(ids)
        missing = [i for i in wanted if i not in state or state[i].failed is not None]
        if missing:
            raise CacheError(f"{self.path}: {len(missing)} requested ids have no features "
                             f"(first: {missing[0]}); run `featcache extract` on this data first")
        dim = self.manifest["dims"][pool]
        out = np.empty(row_shape(self.views, dim, len(wanted)), dtype=dtype)
        shard_of = np.fromiter((state[i].shard for i in wanted), dtype=np.int64, count=len(wanted))
        row_of = np.fromiter((state[i].row for i in wanted), dtype=np.int64, count=len(wanted))
        shards = self.shard_paths()
        for shard_no in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == shard_no)
            rows = row_of[positions]
            data = self._memmap(shards[shard_no], pool)
            # Runs of consecutive rows (the usual case: ids in entry order) are copied as slices.
            if _is_run(positions) and _is_run(rows):
                _convert_into(out[positions[0]:positions[-1] + 1], data[rows[0]:rows[-1] + 1])
            else:
                block = np.empty(row_shape(self.views, dim, len(rows)), dtype=dtype)
                _convert_into(block, data[rows])
                out[positions] = block
        return out

    def iter_chunks(self, pool: str, chunk_rows: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(ids, features)`` chunks in entry order without loading the whole entry."""
        ids = self.ids
        for start in range(0, len(ids), chunk_rows):
            part = ids[start:start + chunk_rows]
            yield part, self.read(pool, part)

    def memmaps(self, pool: str) -> list[np.ndarray]:
        """One read-only memory map per shard (stored dtype; rows in that shard's order)."""
        self._check_pool(pool)
        return [self._memmap(p, pool) for p in self.shard_paths()]

    def _memmap(self, shard: Path, pool: str) -> np.ndarray:
        """A shard's features of ``pool``, their bytes checked against the checksum written with the shard
        the first time this entry reads them (a changed value is refused, never used)."""
        with open_shard(shard) as h5:
            dset = h5[f"features/{pool}"]
            offset, shape, dtype = dset.id.get_offset(), dset.shape, dset.dtype
            recorded = json.loads(h5.attrs.get("features_sha256", "{}")).get(pool)
        if offset is None or shape[0] == 0:  # empty dataset: nothing allocated in the file
            data = np.zeros(shape, dtype=dtype)
        else:
            data = np.memmap(shard, mode="r", dtype=dtype, offset=offset, shape=shape)
        if (shard, pool) not in self._checked:
            if recorded is not None and bytes_hash(data) != recorded:
                raise CacheError(f"{shard}: the features/{pool} bytes no longer match the checksum written with "
                                 f"the shard (changed on disk): they are not used. Run `featcache verify --repair "
                                 f"{self.path}` to drop the shard, then rerun extract to redo its images")
            self._checked.add((shard, pool))
        return data

    def _check_pool(self, pool: str) -> None:
        if pool not in self.pools:
            raise CacheError(f"{self.path}: no pooling {pool!r}; this entry has {', '.join(self.pools)}")


def _convert_into(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` with dtype conversion; float16 -> float32 through torch.

    numpy converts half precision one value at a time (97 ms for HAM10000's 10k x 1280); torch's
    vectorized copy takes 3.5 ms and gives the same bits.
    """
    if source.dtype == np.float16 and target.dtype == np.float32 and target.flags.c_contiguous:
        import torch

        with warnings.catch_warnings():  # a read-only memmap is only read here
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(target).copy_(torch.from_numpy(np.asarray(source)))
    else:
        target[...] = source


def _is_run(index: np.ndarray) -> bool:
    """Whether ``index`` is k, k+1, k+2, ... (so it can be a slice)."""
    return len(index) > 0 and int(index[-1]) - int(index[0]) == len(index) - 1 and bool(np.all(np.diff(index) == 1))


def _read_shard_index(shard: Path, shard_no: int, state: dict[str, ImageState]) -> None:
    """Add the ids of one shard to ``state``; a later shard overrides an earlier one."""
    with open_shard(shard) as h5:
        for prefix in ("", "failed/"):
            ids = h5[f"{prefix}ids"].asstr()[()]
            shas = h5[f"{prefix}sha256"][()]
            sizes, mtimes = h5[f"{prefix}size"][()], h5[f"{prefix}mtime_ns"][()]
            reasons = h5["failed/reason"].asstr()[()] if prefix else None
            for row, image_id in enumerate(ids):
                state.pop(image_id, None)  # re-inserted: keeps the latest order
                state[image_id] = ImageState(shas[row].decode(), int(sizes[row]), int(mtimes[row]),
                                             reasons[row] if prefix else None, shard_no, row)


def checksum_problems(h5: h5py.File) -> list[str]:
    """Pools whose stored feature bytes no longer hash to the checksum written with the shard
    (a bit flip that leaves finite values passes every other check)."""
    recorded = h5.attrs.get("features_sha256")
    if recorded is None:  # written before featcache 0.2: verify says so apart
        return []
    problems = []
    for pool, expected in json.loads(recorded).items():
        if f"features/{pool}" not in h5:
            continue  # reported by the shape checks
        if bytes_hash(h5[f"features/{pool}"][()]) != expected:
            problems.append(f"features/{pool} bytes do not match their checksum (changed on disk)")
    return problems


def rebuild_manifest(entry_dir: Path) -> CacheEntry:
    """Write ``manifest.json`` again from what the shards record (call with the entry lock held).

    Shards written since featcache 0.2 carry their entry's description; every shard must name the
    entry's fingerprint (the folder name), or nothing is written."""
    shards = sorted(Path(entry_dir).glob(SHARD_GLOB))
    if not shards:
        raise CacheError(f"{entry_dir}: no manifest.json and no shards; nothing to rebuild. Delete the "
                         "folder and run `featcache extract` again")
    described = []
    for shard in shards:
        with open_shard(shard) as h5:
            raw = h5.attrs.get("entry")
            provenance = h5.attrs.get("provenance")
        if raw is None:
            raise CacheError(f"{shard} predates featcache 0.2 and does not describe its entry, so "
                             f"{entry_dir / MANIFEST} cannot be rebuilt: delete {entry_dir} and extract again")
        described.append((json.loads(raw), provenance))
    core, provenance = described[-1]
    for other, _ in described:
        if other["fingerprint"] != core["fingerprint"]:
            raise CacheError(f"{entry_dir}: its shards belong to different entries ({other['fingerprint']} "
                             f"and {core['fingerprint']}); run `featcache verify --repair {entry_dir}`")
    if not Path(entry_dir).name.endswith(core["fingerprint"]):
        raise CacheError(f"{entry_dir}: its shards are of entry {core['fingerprint']}, not of this folder; "
                         "move them back where they came from")
    manifest = {**core, "provenance": json.loads(provenance) if provenance else {}, "complete": False}
    write_json_atomic(Path(entry_dir) / MANIFEST, manifest)
    entry = CacheEntry(entry_dir)
    write_json_atomic(Path(entry_dir) / MANIFEST, {**manifest, **shard_summary(entry)})
    return CacheEntry(entry_dir)


def shard_summary(entry: CacheEntry) -> dict:
    """The manifest's summary of what the shards hold (the shards stay the truth)."""
    state = entry.state()
    return {"shards": [p.name for p in entry.shard_paths()],
            "n_images": sum(1 for s in state.values() if s.failed is None),
            "failed": {i: s.failed for i, s in state.items() if s.failed is not None}}


def entry_dirs(cache_root: Path) -> list[Path]:
    """Every entry folder under ``cache_root``: with a manifest, or with shards whose manifest was lost."""
    root = Path(cache_root)
    return sorted({p.parent for pattern in (f"*/*/{MANIFEST}", f"*/*/{SHARD_GLOB}") for p in root.glob(pattern)})


def find_entries(cache_root: Path) -> list[CacheEntry]:
    return [CacheEntry(p.parent) for p in sorted(Path(cache_root).glob(f"*/*/{MANIFEST}"))]
