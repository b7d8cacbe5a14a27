"""The four parameter-sharing layouts of the paper, as a plan of unique layer slots."""

from __future__ import annotations

from dataclasses import dataclass

from mor_dist.config import ConfigError


@dataclass(frozen=True)
class LayerPlan:
    """Which unique layer slot runs at each unrolled depth.

    `prefix` runs once on all tokens, then `block` runs `num_recursions` times (the recursion
    MoR routes), then `suffix` once. Sequence layouts repeat each layer in place instead, so
    their recursion is inside `block` and they cannot be routed.
    """

    sharing: str
    prefix: tuple[int, ...]
    block: tuple[int, ...]
    num_recursions: int
    suffix: tuple[int, ...]
    unrolled: tuple[int, ...]

    @property
    def num_unique(self) -> int:
        return len(set(self.unrolled))

    def describe(self) -> str:
        """Paper notation, e.g. '1 + 10x3 + 1'."""
        if self.sharing in ("cycle", "middle_cycle"):
            parts = [str(len(self.prefix))] if self.prefix else []
            parts.append(f"{len(self.block)}x{self.num_recursions}")
            parts += [str(len(self.suffix))] if self.suffix else []
            return " + ".join(parts) + f" ({self.sharing})"
        if self.num_recursions == 1:
            return f"{len(self.unrolled)} unique (vanilla)"
        inner = len(self.unrolled) - len(self.prefix) - len(self.suffix)
        return f"{len(self.prefix)} + {inner // self.num_recursions}x{self.num_recursions} + {len(self.suffix)} ({self.sharing})"


def layer_plan(sharing: str, num_layers: int, num_recursions: int) -> LayerPlan:
    """Map the effective depth L onto unique slots for one sharing layout."""
    n, depth = num_recursions, num_layers
    if n == 1:
        slots = tuple(range(depth))
        return LayerPlan("none", (), slots, 1, (), slots)
    middle = sharing.startswith("middle_")
    inner = depth - 2 if middle else depth
    if inner < n or inner % n:
        extra = (n - inner % n) % n or n
        where = "num_layers - 2" if middle else "num_layers"
        raise ConfigError(
            f"model.num_layers={depth} cannot be shared as {sharing} over {n} recursions: {where}={inner} "
            f"is not a positive multiple of {n}; use model.num_layers={depth + extra} (the paper adds layers)"
        )
    block_size = inner // n
    prefix, suffix = ((0,), (block_size + 1,)) if middle else ((), ())
    first = 1 if middle else 0
    if sharing in ("cycle", "middle_cycle"):
        block = tuple(range(first, first + block_size))
        unrolled = prefix + block * n + suffix
    elif sharing in ("sequence", "middle_sequence"):
        block = tuple(s for s in range(first, first + block_size) for _ in range(n))
        unrolled = prefix + block + suffix
        return LayerPlan(sharing, prefix, block, n, suffix, unrolled)
    else:
        raise ConfigError(f"model.sharing={sharing!r} is unknown; choose cycle, sequence, middle_cycle or middle_sequence")
    return LayerPlan(sharing, prefix, block, n, suffix, unrolled)
