"""The world dist-bn-verify runs in: Horovod started, and the process sets of each layout.

A layout is `all` (one set of every rank), `node` (one set per node, from
Horovod's local ranks) or an explicit partition such as `0-7:8-15`. Each rank
learns every rank's (rank, local_rank, local_size) once, at `init`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from typing import Any, Sequence

from dist_bn.verify.cases import UsageError


def parse_partition(spec: str, size: int) -> list[list[int]]:
    """An explicit partition "0-7:8-15" (sets separated by ':', ranks by ',',
    ranges a-b) into lists of ranks; every rank of the world exactly once."""
    groups = []
    for part in spec.split(":"):
        ranks = []
        for item in part.split(","):
            item = item.strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not match:
                raise UsageError(f"process set {spec!r}: {item!r} is not a rank or a range a-b")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise UsageError(f"process set {spec!r}: range {item!r} is empty")
            ranks.extend(range(lo, hi + 1))
        groups.append(ranks)
    flat = [r for g in groups for r in g]
    if sorted(flat) != list(range(size)):
        missing = sorted(set(range(size)) - set(flat))
        extra = sorted({r for r in flat if flat.count(r) > 1 or r >= size})
        detail = "; ".join(filter(None, [f"missing {missing}" if missing else "",
                                         f"repeated or out of range {extra}" if extra else ""]))
        raise UsageError(f"process set {spec!r} must list every rank 0..{size - 1} exactly once ({detail})")
    return [sorted(g) for g in groups]


def node_blocks(layout: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    """The ranks of each node from every rank's (rank, local_rank, local_size),
    read as Horovod places them: runs of local_size consecutive ranks."""
    blocks, rank = [], 0
    local_size = {r: ls for r, _, ls in layout}
    while rank < len(layout):
        size = max(1, local_size.get(rank, 1))
        blocks.append(list(range(rank, rank + size)))
        rank += size
    return blocks


def node_partition(layout: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    """One set per node (`node_blocks`), checked: the ranks of a node must be
    consecutive (horovodrun places them so, and mpirun with -map-by slot);
    otherwise a clear error."""
    by_rank = {r: (lr, ls) for r, lr, ls in layout}
    blocks = node_blocks(layout)
    for block in blocks:
        for i, r in enumerate(block):
            if by_rank.get(r) != (i, len(block)):
                seen = by_rank.get(r)
                got = f"local rank {seen[0]} of {seen[1]}" if seen else "no such rank"
                raise UsageError(
                    "--process-sets node needs the ranks of each node to be consecutive, but rank "
                    f"{r} has {got} where local rank {i} of {len(block)} belongs; start ranks by slot "
                    "(horovodrun does; mpirun: -map-by slot) or give the sets explicitly, e.g. 0-7:8-15")
    return blocks


@dataclasses.dataclass(frozen=True)
class Group:
    """The ranks this rank shares statistics with under one process-set layout."""

    label: str  # the layout: all, node, or the partition spec
    ranks: tuple[int, ...]
    process_set: Any = None  # hvd.ProcessSet, or None for all ranks

    @property
    def horovod_set(self):
        import horovod.tensorflow as hvd

        return self.process_set or hvd.global_process_set


@dataclasses.dataclass(frozen=True)
class World:
    """What `init` learnt: this rank's Group per layout, and every rank's
    (rank, local_rank, local_size)."""

    groups: dict[str, Group]
    layout: tuple[tuple[int, int, int], ...]

    @property
    def node_sizes(self) -> list[int]:
        return [len(block) for block in node_blocks(self.layout)]


def gloo_loopback_warning() -> str | None:
    """A warning when Horovod's Gloo controller is about to span hosts from a
    host whose name resolves to a loopback address: Horovod 0.28.1 creates the
    communicators of process sets (the global one included) on the address of
    the host's name, not on --network-interfaces, so the first collective
    fails with "connect [127.x.x.x]:PORT: Connection refused"."""
    if not os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") or os.environ.get("HOROVOD_CROSS_SIZE", "1") == "1":
        return None
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return f"this host's name {name!r} does not resolve; Horovod's Gloo controller needs it to"
    if address.startswith("127."):
        return (f"this host's name {name!r} resolves to {address}: Horovod 0.28.1's Gloo controller binds "
                "process-set communicators to that address and the ranks on other hosts cannot reach it. "
                "Map the name to this host's cluster address (/etc/hosts) or use the MPI controller.")
    return None


def init(layouts: Sequence[str] = ("all",), device: str = "auto", prog: str = "dist-bn-verify") -> World:
    """Start Horovod (process sets added dynamically when a layout needs them)
    and pin this rank to GPU local_rank (device "auto" or "gpu") or to the CPU.
    Raises UsageError for a bad layout."""
    if any(layout != "all" for layout in layouts):
        os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"
    import horovod.tensorflow as hvd
    import tensorflow as tf

    from dist_bn.training.distributed import pin_local_gpu

    warning = gloo_loopback_warning()
    if warning:
        print(f"{prog}: warning: {warning}", file=sys.stderr, flush=True)
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    hvd.init()
    if device != "cpu":
        pinned = pin_local_gpu()
        if pinned is None and device == "gpu":
            raise UsageError("--device gpu: TensorFlow sees no GPU on this rank")

    layout = tuple(tuple(entry) for entry in hvd.allgather_object(
        (hvd.rank(), hvd.local_rank(), hvd.local_size()), name="verify/layout"))
    world = tuple(range(hvd.size()))
    registered: dict[tuple[int, ...], Any] = {world: None}
    groups = {}
    for label in layouts:
        if label == "all":
            partition = [list(world)]
        elif label == "node":
            partition = node_partition(layout)
        else:
            partition = parse_partition(label, hvd.size())
        for ranks in partition:  # the same sets in the same order on every rank
            key = tuple(ranks)
            if key not in registered:
                registered[key] = hvd.add_process_set(list(key))
        mine = next(tuple(g) for g in partition if hvd.rank() in g)
        groups[label] = Group(label, mine, registered[mine])
    return World(groups, layout)
