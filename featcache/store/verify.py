"""``featcache verify``: check a cache entry end to end, say what is wrong in plain words, repair.

A check never trusts the manifest alone: every shard is opened and read, its fingerprint,
shapes, dtypes, ids and values are checked, and the images it lists are hashed again against the
files on disk. ``repair`` drops what cannot be trusted (damaged shards, leftovers of interrupted
writes) and rewrites the manifest, so that the next ``featcache extract`` redoes only those images.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featcache.data.sources import ImageSource, open_source, read_record
from featcache.errors import CacheError, EntryLocked, FeatcacheError
from featcache.store.entries import (
    MANIFEST,
    SHARD_GLOB,
    TEMP_MARK,
    CacheEntry,
    EntryLock,
    checksum_problems,
    rebuild_manifest,
    row_shape,
    shard_summary,
    write_json_atomic,
)
from featcache.store.naming import fingerprint

SHA_HEX = re.compile(rb"^[0-9a-f]{64}$")
ROW_FIELDS = ("ids", "sha256", "size", "mtime_ns")
NO_CHECKSUM = "no feature checksums (written before featcache 0.2)"


@dataclass
class Finding:
    """One problem: where, what, and the command (or ``--repair``) that fixes it."""

    where: str
    what: str
    fix: str
    repairable: bool = False
    severity: str = "error"  # "error": results could be wrong; "warning": work is missing, not wrong

    def line(self) -> str:
        return f"{self.where}: {self.what} -> {self.fix}"


@dataclass
class VerifyReport:
    entry: Path
    shards: int = 0
    images: int = 0
    failed: int = 0
    checked_files: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


class Unreadable(CacheError):
    """A file the operating system will not let featcache read (permission, I/O error): not judged damaged."""


def check_shard(shard: Path, manifest: dict) -> tuple[list[str], int]:
    """Problems of one shard (empty when sound), and its number of failed rows; :class:`Unreadable` when
    the operating system refuses to read it (its content cannot be judged, so it is never dropped)."""
    try:
        with open(shard, "rb") as handle:
            handle.read(4096)
    except OSError as exc:
        raise Unreadable(f"cannot be read ({exc.strerror or exc})") from None
    try:
        h5 = h5py.File(shard, "r")
    except OSError as exc:
        return [f"cannot be opened ({exc})"], 0
    problems: list[str] = []
    with h5:
        try:
            attr_fp = h5.attrs.get("fingerprint")
            if attr_fp != manifest["fingerprint"]:
                problems.append(f"belongs to another entry (fingerprint {attr_fp}, "
                                f"this entry is {manifest['fingerprint']})")
            ids = list(h5["ids"].asstr()[()])
            failed_ids = list(h5["failed/ids"].asstr()[()])
            for prefix, n in (("", len(ids)), ("failed/", len(failed_ids))):
                lengths = {name: len(h5[prefix + name]) for name in ROW_FIELDS}
                if prefix:
                    lengths["reason"] = len(h5["failed/reason"])
                if set(lengths.values()) != {n}:
                    problems.append(f"{prefix or 'row '}columns have different lengths {lengths}")
                bad_sha = sum(1 for s in h5[prefix + "sha256"][()] if not SHA_HEX.match(bytes(s)))
                if bad_sha:
                    problems.append(f"{bad_sha} malformed SHA-256 values in {prefix}sha256")
            if len(set(ids)) != len(ids):
                problems.append(f"{len(ids) - len(set(ids))} duplicate ids")
            if set(ids) & set(failed_ids):
                problems.append("ids listed both as extracted and as failed")
            for pool in manifest["pools"]:
                name = f"features/{pool}"
                if name not in h5:
                    problems.append(f"no {name} dataset")
                    continue
                dset = h5[name]
                expected = row_shape(len(manifest.get("views", ["identity"])), manifest["dims"][pool], len(ids))
                if dset.shape != expected:
                    problems.append(f"{name} has shape {dset.shape}, expected {expected}")
                    continue
                if dset.dtype != np.dtype(manifest["dtype"]):
                    problems.append(f"{name} is {dset.dtype}, the entry stores {manifest['dtype']}")
                bad_rows = sum(int((~np.isfinite(dset[start:start + 4096])).reshape(
                                   min(4096, dset.shape[0] - start), -1).any(axis=1).sum())
                               for start in range(0, dset.shape[0], 4096))
                if bad_rows:
                    problems.append(f"{bad_rows} rows of {name} hold NaN/Inf")
            problems += checksum_problems(h5)
            if "features_sha256" not in h5.attrs:
                problems.append(NO_CHECKSUM)
        except (KeyError, OSError, ValueError, TypeError) as exc:
            problems.append(f"is incomplete or damaged ({exc})")
            return problems, 0
    return problems, len(failed_ids)


def _check_files(source: ImageSource, state: dict, report: VerifyReport) -> None:
    """Hash every image the entry holds against its file: changed or missing files are stale."""

    changed, missing_files, not_extracted, npz_cache = [], [], [], {}
    for record in source.records:
        known = state.get(record.id)
        if known is None:
            not_extracted.append(record.id)
            continue
        try:
            sha = read_record(record, npz_cache)[1]
        except (OSError, KeyError, ValueError):
            missing_files.append(record.id)
            continue
        report.checked_files += 1
        if sha != known.sha256:
            changed.append(record.id)
    data = f"--data {source.location}"
    if changed:
        report.findings.append(Finding(
            "images", f"{len(changed)} files changed since their features were extracted (first: {changed[0]})",
            f"`featcache extract {data} --rehash` re-extracts exactly those (a file rewritten with the same size "
            "and time is found only by its content)",
            severity="error"))
    if missing_files:
        report.findings.append(Finding(
            "images", f"{len(missing_files)} listed files can no longer be read (first: {missing_files[0]})",
            "restore them, or drop them from the source list", severity="warning"))
    if not_extracted:
        report.findings.append(Finding(
            "images", f"{len(not_extracted)} images of the source are not in the entry yet "
            f"(first: {not_extracted[0]})", f"`featcache extract {data}` adds them", severity="warning"))


def _manifest_damage(path: Path) -> str | None:
    """Why ``manifest.json`` cannot be used (missing, not JSON, keys lost), or None when it can. A file
    that cannot be read for an OS reason (permission, I/O) is not damage: it is raised, never rebuilt."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror or exc}): left as it is; fix its permissions or "
                         "the drive, then verify again") from None
    except ValueError as exc:
        return f"damaged ({exc})"
    missing = [k for k in ("fingerprint", "fingerprint_inputs", "pools", "dims", "dtype") if k not in manifest]
    return f"damaged (no {', '.join(missing)})" if missing else None


def verify_entry(entry_dir: str | Path, source: ImageSource | None = None, repair: bool = False,
                 check_files: bool = True, break_lock: bool = False) -> VerifyReport:
    """Check one entry; with ``repair`` drop damaged shards and temporaries and rewrite the manifest."""
    entry_dir = Path(entry_dir)
    report = VerifyReport(entry_dir)
    manifest_path = entry_dir / MANIFEST
    damage = _manifest_damage(manifest_path)
    if damage and any(entry_dir.glob(SHARD_GLOB)):
        if not repair:
            report.findings.append(Finding(
                MANIFEST, f"{damage} (the shards are still there)",
                f"`featcache verify --repair {entry_dir}` rebuilds it from the shards (runs are kept)", True))
            return report
        with EntryLock(entry_dir, break_lock=break_lock):
            rebuild_manifest(entry_dir)
        was = "" if damage == "missing" else f" (it was {damage})"
        report.repaired.append(f"rebuilt manifest.json from the shards{was}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_fp = fingerprint(manifest["fingerprint_inputs"])
    except (OSError, ValueError, KeyError) as exc:
        raise CacheError(f"{manifest_path} cannot be read ({exc}) and there are no shards to rebuild it from: "
                         f"this is not a usable cache entry; delete {entry_dir} and run `featcache extract` "
                         "again") from None
    if expected_fp != manifest["fingerprint"] or not entry_dir.name.endswith(expected_fp):
        report.findings.append(Finding(
            MANIFEST, f"fingerprint {manifest['fingerprint']} (folder {entry_dir.name}) does not match its "
            f"recorded inputs ({expected_fp}): features could be served for the wrong settings",
            f"delete {entry_dir} and extract again"))
    with ExitStack() as held:
        try:
            held.enter_context(EntryLock(entry_dir, break_lock=break_lock))
            locked = True
        except EntryLocked as exc:
            if repair:
                raise
            report.notes.append(f"{exc}: shards may still change while this check runs")
            locked = False
        except CacheError:  # read-only cache: checking still works, repairing cannot
            if repair:
                raise
            locked = False
        _verify_locked(entry_dir, manifest, source, repair, check_files, locked, report)
    return report


def _verify_locked(entry_dir: Path, manifest: dict, source: ImageSource | None, repair: bool,
                   check_files: bool, locked: bool, report: VerifyReport) -> None:
    if locked:  # with the lock held, any temporary is a leftover of a dead writer
        for leftover in sorted(entry_dir.glob(f".*{TEMP_MARK}*")):
            report.findings.append(Finding(
                leftover.name, "unfinished file of an interrupted write (never read as data)",
                "`featcache verify --repair` deletes it (extract also does)", True, "warning"))
            if repair:
                leftover.unlink()
                report.repaired.append(f"deleted {leftover.name}")
    shards = sorted(entry_dir.glob(SHARD_GLOB))
    dropped = 0
    unchecked = []
    for shard in shards:
        try:
            problems, n_failed = check_shard(shard, manifest)
        except Unreadable as exc:
            report.findings.append(Finding(
                shard.name, f"{exc}: its content cannot be judged, so repair leaves it alone",
                "fix its permissions or the drive, then verify again"))
            continue
        if NO_CHECKSUM in problems:  # old but not damaged: said once below, never dropped
            problems.remove(NO_CHECKSUM)
            unchecked.append(shard.name)
        if problems:
            report.findings.append(Finding(
                shard.name, "; ".join(problems),
                "`featcache verify --repair` drops the shard; `featcache extract` then redoes its images", True))
            if repair:
                shard.unlink()
                dropped += 1
                report.repaired.append(f"dropped {shard.name}")
            continue
        report.shards += 1
        report.failed += n_failed
    if unchecked:
        report.findings.append(Finding(
            f"{len(unchecked)} shards", f"{NO_CHECKSUM}: a changed feature value in them cannot be detected "
            f"(first: {unchecked[0]})", "delete the entry and extract again to add checksums", severity="warning"))
    listed = set(manifest.get("shards", []))
    present = {p.name for p in entry_dir.glob(SHARD_GLOB)}
    if listed and listed != present:
        lost = sorted(listed - present)
        what = (f"lists {len(listed)} shards but {len(present)} are present" +
                (f"; missing: {', '.join(lost[:3])}{' …' if len(lost) > 3 else ''} (their images have no features)"
                 if lost else ""))
        report.findings.append(Finding(
            MANIFEST, what, "`featcache verify --repair` rewrites it from the shards; `featcache extract` then "
            "redoes the missing images", True, "error" if lost else "warning"))
    if repair and (dropped or (listed and listed != present)):
        write_json_atomic(entry_dir / MANIFEST,
                          {**manifest, "complete": False, **shard_summary(CacheEntry(entry_dir))})
        report.repaired.append("rewrote manifest.json from the remaining shards")
    try:
        state = CacheEntry(entry_dir).state()
    except CacheError:
        report.notes.append("image files not checked: repair the damaged shards first")
        return
    report.images = sum(1 for s in state.values() if s.failed is None)
    if not check_files:
        return
    if source is None:
        try:
            source = open_source(manifest["source"])
        except FeatcacheError as exc:
            report.notes.append(f"image files not checked: the source {manifest['source']} cannot be "
                                f"opened ({exc}); pass --data")
            return
    _check_files(source, state, report)


def verify_cache(target: Path, data: str | None = None, repair: bool = False, check_files: bool = True,
                 break_lock: bool = False) -> Iterator[tuple[Path, list[str], VerifyReport]]:
    """Check ``target`` (an entry folder, or a cache root: each entry in it), repairing first when asked:
    for each entry its folder, what was repaired, and what the check found."""
    from featcache.data.sources import open_source
    from featcache.store.entries import MANIFEST, SHARD_GLOB, entry_dirs

    target = Path(target)
    if (target / MANIFEST).is_file() or any(target.glob(SHARD_GLOB)):
        entries = [target]
    else:
        entries = entry_dirs(target)
        if not entries:
            raise CacheError(f"{target}: neither a cache entry nor a cache root with entries in it")
    source = open_source(data) if data else None
    for entry_dir in entries:
        repaired = []
        if repair:
            repaired = verify_entry(entry_dir, source, repair=True, check_files=False, break_lock=break_lock).repaired
        yield entry_dir, repaired, verify_entry(entry_dir, source, check_files=check_files)
