"""Directories filled shard by shard (the feature cache, distilled data) and the identity keys of cached results.

Why one base: every such directory needs the same guarantees, and each copy of them was a place for them to drift.

- It is claimed (``kangaroo_infer.files.claim_directory``), so a directory holding anything else is refused before any
  work and never filled; one written before claims existed is recognised by its manifest's key field.
- ``manifest.json`` records the identity (everything the contents depend on), so contents built for anything else are
  refused with the fields that differ, never reused.
- Every shard carries the identity's key, so a shard left from another identity is recognised even without a manifest.
- Shard i belongs to rank i % world size; a rank rebuilds only its missing or unreadable shards, so an interrupted run
  loses at most the shards in flight.
- Every file is written atomically (``kangaroo_infer.files.atomic_file`` / ``write_file``).

Layout: ``manifest.json`` and ``shard-00000<SUFFIX>``, ``shard-00001<SUFFIX>``, ... plus what a subclass assembles.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from kangaroo_infer.files import check_claimable, claim_directory, write_file

from .checks import require_positive_int

MANIFEST_NAME = "manifest.json"


def sha256_json(value: Any) -> str:
    """The hex sha256 of ``value`` as canonical JSON (sorted keys): the key of an identity."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file; one error naming ``what`` (e.g. "Feature cache
    manifest"), the file and ``fix`` when it is unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is unreadable ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} is not a JSON object; {fix}")
    return value


def difference(theirs: Any, ours: Any, on_disk: str) -> str:
    """How a value on disk differs from this run's: per key for two dicts, each side cut to 80 characters."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        return "; ".join(f"{k}: {difference(theirs.get(k), ours.get(k), on_disk)}" for k in keys)
    return f"{on_disk} {theirs!r:.80} vs run {ours!r:.80}"


class ShardedDirectory:
    """A directory of shards for one identity (module docstring). Subclasses name themselves in the class attributes
    and say how a shard carries its key (``shard_key``) and which files make the directory complete
    (``complete_files``); building the shards themselves is theirs."""

    LABEL: ClassVar[str]  # how messages name the contents, e.g. "Feature cache"
    GROUP: ClassVar[str]  # the config group and stage: GROUP.dir, GROUP.shard_size, "rerun the GROUP stage"
    OWNER: ClassVar[str]  # the writer named in the directory's written list (claim_directory)
    KEY_FIELD: ClassVar[str]  # the manifest's and every shard's field holding the identity's key
    SUFFIX: ClassVar[str]  # of the shard files
    OTHER: ClassVar[str]  # what a foreign shard was written for, e.g. "another cache (base, exit layer, dtype or data)"
    ON_DISK: ClassVar[str] = "on disk"  # how a stale message names the values found on disk
    # {directory}, {fields} (the differing identity fields), {differ} ("differs"/"differ"), {detail}
    STALE: ClassVar[str]

    def __init__(self, directory: str | Path, identity: dict[str, Any], shard_size: int) -> None:
        require_positive_int(f"{self.GROUP}.shard_size", shard_size)
        self.directory = Path(directory).expanduser()
        self.shard_size = shard_size
        self.identity = identity
        self.key = sha256_json(identity)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def shard_path(self, index: int) -> Path:
        return self.directory / f"shard-{index:05d}{self.SUFFIX}"

    def bounds(self, index: int, num_items: int) -> tuple[int, int]:
        """The items [lo, hi) of shard ``index``."""
        return index * self.shard_size, min(num_items, (index + 1) * self.shard_size)

    # -- the directory ------------------------------------------------------------------------------------------

    @classmethod
    def dir_fix(cls) -> str:
        return f"Set {cls.GROUP}.dir to a new or empty directory, or to one the {cls.GROUP} stage wrote."

    @classmethod
    def check_directory(cls, directory: str | Path) -> None:
        """Refuse a directory holding files this writer did not write (read-only: before any stage runs)."""
        check_claimable(directory, cls.OWNER, legacy=cls._written_before_claims(directory), fix=cls.dir_fix())

    @classmethod
    def _written_before_claims(cls, directory: str | Path) -> bool:
        """Whether ``directory`` holds a manifest of this writer (how directories written before claims existed are
        recognised as its own)."""
        try:
            manifest = json.loads((Path(directory).expanduser() / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and cls.KEY_FIELD in manifest

    # -- the manifest -------------------------------------------------------------------------------------------

    def _rerun(self) -> str:
        return f"delete {self.directory} (or set {self.GROUP}.dir elsewhere) and rerun the {self.GROUP} stage."

    def read_manifest(self) -> dict[str, Any] | None:
        return read_json_object(self.manifest_path, f"{self.LABEL} manifest", self._rerun())

    def manifest(self, **values: Any) -> dict[str, Any]:
        """The identity, its key, then ``values`` (completeness, counts, shards)."""
        return {**self.identity, self.KEY_FIELD: self.key, **values}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Any rank may write it: identical content for identical state, and the write is atomic."""
        self.write(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def write(self, path: Path, text: str) -> None:
        """One file of this claimed directory (every file in it is this writer's), atomically."""
        write_file(path, text, self.OWNER, overwrite=True)

    def check(self) -> None:
        """Refuse contents on disk made for another identity, naming the fields that differ."""
        manifest = self.read_manifest()
        if manifest is None:
            return  # nothing built yet: nothing stale
        differing = [field for field, ours in self.identity.items() if manifest.get(field) != ours]
        if not differing:
            return
        details = [difference(manifest.get(field), self.identity[field], self.ON_DISK) for field in differing]
        if len(differing) > 1:
            details = [f"{field}: {detail}" for field, detail in zip(differing, details, strict=True)]
        raise ValueError(
            self.STALE.format(
                directory=self.directory,
                fields=", ".join(differing),
                differ="differs" if len(differing) == 1 else "differ",
                detail="; ".join(details),
            )
        )

    def is_complete(self) -> bool:
        """True when the contents on disk are this identity's and finished (every file of ``complete_files``)."""
        try:
            self.check()
            manifest = self.read_manifest()
        except ValueError:
            return False
        if manifest is None or not manifest.get("complete"):
            return False
        return all(path.is_file() for path in self.complete_files(manifest))

    def complete_files(self, manifest: dict[str, Any]) -> list[Path]:
        """The files a complete directory holds, by its manifest."""
        raise NotImplementedError

    # -- shards -------------------------------------------------------------------------------------------------

    def shard_key(self, path: Path) -> str | None:
        """The key a finished shard file carries, or None when it is unreadable (it is then rebuilt)."""
        raise NotImplementedError

    def shard_is_valid(self, index: int) -> bool:
        """A finished shard of this identity: False when missing or unreadable (rebuilt), an error when it belongs to
        another identity (a directory of two identities is never mixed)."""
        path = self.shard_path(index)
        if not path.is_file():
            return False
        key = self.shard_key(path)
        if key is None:
            return False
        if key != self.key:
            raise ValueError(
                f"{self.LABEL} shard {path} was written for {self.OTHER}; delete the directory {self.directory} or set "
                f"{self.GROUP}.dir elsewhere."
            )
        return True

    def start(self, num_shards: int, rank: int, world_size: int, first_manifest: dict[str, Any]) -> list[int]:
        """Claim and check the directory, write ``first_manifest`` if there is none yet, remove this rank's
        temporaries of an interrupted write, and return this rank's shards still to build (shard i is rank
        i % world_size's)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        claim_directory(self.directory, self.OWNER, legacy=self._written_before_claims(self.directory),
                        fix=self.dir_fix())  # fmt: skip
        self.check()
        if self.read_manifest() is None:
            self.write_manifest(first_manifest)
        mine = [i for i in range(num_shards) if i % world_size == rank]
        for index in mine:
            name = self.shard_path(index).name
            # atomic_file's temporaries, and those of the writers before it (NAME.tmp-PID)
            for tmp in [*self.directory.glob(f".{name}.*.tmp"), *self.directory.glob(f"{name}.tmp-*")]:
                tmp.unlink(missing_ok=True)
        return [i for i in mine if not self.shard_is_valid(i)]
