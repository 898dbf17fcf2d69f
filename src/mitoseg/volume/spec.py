"""The description of a volume job that every task carries, and the default block depth.

:class:`JobSpec` is small and picklable: the input and output locations, the volume's
shape, the block grid (z-blocks of whole slices, or ``block_z x block_yx x block_yx``
boxes, z-major) and the inference plan as JSON. :func:`auto_block_z` is the block depth
``mitoseg predict`` uses when none is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mitoseg.inference.plan import InferencePlan

__all__ = ["AUTO_BLOCK_VOXELS", "MAX_HALO_SHARE", "MIN_BLOCK_Z", "JobSpec", "auto_block_z"]


@dataclass(frozen=True)
class JobSpec:
    """What every task needs (picklable, small)."""

    source: str
    target: str
    voxel_size_nm: tuple[float, float, float] | None
    shape: tuple[int, int, int]
    block_z: int
    plan_json: str
    plugin: str
    instance_class: int | None
    probabilities: bool
    block_yx: int | None = None

    @property
    def grid(self) -> tuple[int, int, int]:
        """Blocks along z, y and x (one along y and x for whole-slice blocks)."""
        z, y, x = self.shape
        side = self.block_yx
        return (
            -(-z // self.block_z),
            1 if side is None else -(-y // side),
            (1 if side is None else -(-x // side)),
        )

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """``(block_z, by, bx)``: the size of a full block."""
        _, y, x = self.shape
        side = self.block_yx
        return self.block_z, y if side is None else side, x if side is None else side

    @property
    def n_blocks(self) -> int:
        """Number of blocks (z-major, then y, then x)."""
        nz, ny, nx = self.grid
        return nz * ny * nx

    def region(self, b: int) -> tuple[int, int, int, int, int, int]:
        """``(z0, z1, y0, y1, x0, x1)`` block ``b`` writes."""
        _, ny, nx = self.grid
        zb, rest = divmod(b, ny * nx)
        yb, xb = divmod(rest, nx)
        bz, by, bx = self.block_shape
        z, y, x = self.shape
        return (zb * bz, min(z, (zb + 1) * bz), yb * by, min(y, (yb + 1) * by), xb * bx,
                min(x, (xb + 1) * bx))  # fmt: skip

    def plan(self) -> InferencePlan:
        """The inference plan."""
        return InferencePlan.model_validate_json(self.plan_json)


#: Smallest automatic block depth (slices), the largest share of a block's predictions
#: the z-averaging halo may take, and the voxel budget of one automatic block.
MIN_BLOCK_Z, MAX_HALO_SHARE, AUTO_BLOCK_VOXELS = 8, 0.10, 2**27


def auto_block_z(plan: InferencePlan, shape: tuple[int, int, int], block_yx: int | None) -> int:
    """The default slices per block for ``plan`` on a ``(Z, Y, X)`` volume.

    A block predicts its own slices plus ``plan.z_average`` on each side (the halo its
    z-averaging reads; 2.5D context slices are only read). The depth is the smallest at
    or above :data:`MIN_BLOCK_Z` whose halo costs at most :data:`MAX_HALO_SHARE` of the
    block's predictions (20 slices for ``z_average = 1``), within
    :data:`AUTO_BLOCK_VOXELS` voxels per block (whole slices, or ``block_yx`` tiles) and
    the volume's depth. Deeper blocks mean fewer of them: a volume of few blocks spreads
    less evenly over the workers.
    """
    depth, y, x = shape
    side = (y * x) if block_yx is None else min(y, block_yx) * min(x, block_yx)
    want = max(MIN_BLOCK_Z, math.ceil(2 * plan.z_average / MAX_HALO_SHARE))
    budget = max(MIN_BLOCK_Z, AUTO_BLOCK_VOXELS // max(1, side))
    return max(1, min(want, budget, depth))
