"""The FUSE store's records: a branch (its layer stack), a commit between its steps,
and the hooks the filesystem hears store changes through."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

import attrs

from ..._branch import Change
from ..._manifest import Entry, Manifest
from ._layers import Layer, Quota, View

__all__ = ["BranchRec", "CommitJob", "Hooks", "NoHooks", "depth_key"]


@attrs.define(eq=False)
class BranchRec:
    """One branch: its layer stack (top first) and where its snapshot starts."""

    id: int
    name: str
    parent: int | None
    layers: list[Layer]
    nsnap: int  # the bottom nsnap layers (plus the base) are the parent at the fork
    gen: int | None  # top-level branches: the base generation at the fork
    epoch: int = 0  # bumped on every change of the namespace (the FS caches by it)
    created: float = attrs.Factory(time.time)
    quota: Quota = attrs.Factory(Quota)  # its disk limit (not persisted: the agent re-sends it)

    def own_layers(self) -> list[Layer]:
        return self.layers[: len(self.layers) - self.nsnap]

    def snapshot_layers(self) -> list[Layer]:
        return self.layers[len(self.layers) - self.nsnap:]

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "parent": self.parent,
                "layers": [layer.id for layer in self.layers], "nsnap": self.nsnap,
                "gen": self.gen, "created": self.created}


@attrs.define(eq=False)
class CommitJob:
    """A commit between its steps (see :meth:`Store.commit_prepare`)."""

    b: BranchRec
    p: BranchRec | None
    paths: set[str]
    below: View
    rescan: bool
    busy: tuple[int, ...]
    heavy: bool = True  # run commit_work in a worker thread (else inline: a small commit)
    changes: list[Change] = attrs.Factory(list)
    new_base: Manifest | None = None
    base_patch: dict[str, Entry | None] = attrs.Factory(dict)
    merged: list[str] = attrs.Factory(list)


class Hooks(Protocol):
    """What the filesystem layer must hear about (caches, open files, inodes)."""

    def froze(self, b: BranchRec, old_top: Layer) -> None: ...

    def merged(self, b: BranchRec, paths: Iterable[str]) -> None: ...

    def gone(self, bid: int) -> None: ...

    def held_open(self, b: BranchRec) -> int:
        """Bytes of ``b``'s files removed while still open (held until their last close)."""
        ...


class NoHooks:
    def froze(self, b: BranchRec, old_top: Layer) -> None:
        pass

    def merged(self, b: BranchRec, paths: Iterable[str]) -> None:
        pass

    def gone(self, bid: int) -> None:
        pass

    def held_open(self, b: BranchRec) -> int:
        return 0


def depth_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))
