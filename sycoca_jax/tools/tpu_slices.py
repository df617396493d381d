"""TPU slices by name: Cloud names (``v5p-128``: v4/v5p count TensorCores, v5e/v6e chips) or
libtpu's form (``v5p:4x4x4``), and what ``jax.experimental.topologies`` needs to describe them."""

from __future__ import annotations

import dataclasses
import math
import re

from sycoca_jax import hardware


@dataclasses.dataclass(frozen=True)
class Generation:
    """What differs between TPU generations for compiling: the slice's shape rank and whether the
    Cloud name counts TensorCores (2 per chip) or chips. (Per-chip FLOP/s, HBM size and bandwidth
    are in ``sycoca_jax.hardware.CHIPS``.)"""

    libtpu_name: str
    rank: int
    cores_per_chip_in_name: int
    chip_config: str  # "megacore": one JAX device per chip from two TensorCores


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore"),
    "v5p": Generation("v5p", 3, 2, "megacore"),
    "v5e": Generation("v5e", 2, 1, "default"),
    "v6e": Generation("v6e", 2, 1, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """One TPU slice, in the terms ``jax.experimental.topologies.get_topology_desc`` takes."""

    name: str
    generation: str
    shape: tuple[int, ...]  # chips along each axis of the slice
    chip_config: str

    @property
    def chip(self) -> hardware.ChipSpec:
        return hardware.CHIPS[self.generation]

    @property
    def hbm_gib(self) -> float:
        return self.chip.hbm_gib

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_topology(self) -> str:
        return f"{GENERATIONS[self.generation].libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: 3-D slices wrap around once every side is at least 4 chips; 2-D slices
        along a full 16-chip side."""
        if len(self.shape) == 3:
            full = min(self.shape) >= 4
            return (full, full, full)
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis: 2×2, except the single-host 8-chip v5e/v6e slices
        (2×4) and slices smaller than a host."""
        if len(self.shape) == 2 and self.chips == 8:
            return (2, 4, 1)
        if self.chips < 4:
            return (*self.shape, *(1,) * (3 - len(self.shape)))
        return (2, 2, 1)


def _doubling_shape(chips: int, rank: int) -> tuple[int, ...] | None:
    """The standard slice shape for a power-of-two chip count: 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ...; 2-D 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16. None for other counts."""
    if chips < 1 or chips & (chips - 1):
        return None
    if chips == 1:
        return (1,) * rank
    if chips == 2:
        return (1, 2, 1) if rank == 3 else (1, 2)
    shape = [2, 2, 1] if rank == 3 else [2, 2]
    while math.prod(shape) < chips:
        if rank == 3:
            biggest = max(shape)
            smaller = [i for i, s in enumerate(shape) if s < biggest]
            shape[smaller[-1] if smaller else 2] *= 2
        else:
            shape[1 if shape[0] == shape[1] else 0] *= 2
    return tuple(shape)


def parse_topology(name: str) -> TpuTarget:
    """``v5p-128`` (Cloud name: v4/v5p count TensorCores, v5e/v6e chips) or ``v5p:4x4x4``."""
    text = name.strip().lower()
    if text.startswith("tpu "):
        text = text[4:]
    raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    cloud = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not (raw or cloud):
        raise ValueError(
            f"--topology={name!r}: give a TPU slice like v4-32, v5e-64, v5p-128, v6e-256 or "
            "libtpu's form like v5p:4x4x4 (GPUs cannot be targeted from here: run "
            "python -m sycoca_jax.tools.benchmark on one GPU node instead)"
        )
    prefix = (raw or cloud).group(1)
    generation = ALIASES.get(prefix, prefix)
    if generation not in GENERATIONS:
        raise ValueError(
            f"--topology={name!r}: unknown TPU generation {prefix!r}; known: "
            f"{', '.join(sorted(GENERATIONS))} (and {', '.join(sorted(ALIASES))})"
        )
    gen = GENERATIONS[generation]
    if raw:
        shape = tuple(int(s) for s in raw.group(2).split("x"))
        if len(shape) != gen.rank:
            raise ValueError(f"--topology={name!r}: {generation} slices have {gen.rank} axes")
    else:
        count = int(cloud.group(2))
        chips, odd = divmod(count, gen.cores_per_chip_in_name)
        shape = None if odd else _doubling_shape(chips, gen.rank)
        if shape is None:
            raise ValueError(
                f"--topology={name!r}: no standard {generation} slice has {count} "
                f"{'TensorCores' if gen.cores_per_chip_in_name == 2 else 'chips'}; give its "
                f"shape instead, e.g. {gen.libtpu_name}:{'x'.join(['4'] * gen.rank)}"
            )
    return TpuTarget(name, generation, shape, gen.chip_config)
