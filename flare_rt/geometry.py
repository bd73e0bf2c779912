"""The grid of a 3D image in physical space, as SimpleITK and ITK describe it (no SimpleITK needed).

``size``, ``spacing`` and ``origin`` are in ITK's index order (x, y, z), ``direction`` holds the nine
direction cosines row-major with one column per index axis, in ITK's LPS patient coordinates: exactly the
numbers ``image.GetSize()``, ``GetSpacing()``, ``GetOrigin()`` and ``GetDirection()`` return. Arrays are
indexed (z, y, x) (``Geometry.shape``), as ``SimpleITK.GetArrayFromImage`` returns them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]  # voxels along x, y, z
    spacing: tuple[float, float, float]  # mm along x, y, z
    origin: tuple[float, float, float]  # LPS position (mm) of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 3x3 row-major, columns = index axes x, y, z in LPS

    def __post_init__(self) -> None:
        for name, n in (("size", 3), ("spacing", 3), ("origin", 3), ("direction", 9)):
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise ConfigError(f"geometry {name} needs {n} values, got {value}")
            # + 0.0: SimpleITK's images hold no negative zeros (and ITK's writer tells them apart)
            object.__setattr__(self, name, tuple(int(v) for v in value) if name == "size"
                               else tuple(float(v) + 0.0 for v in value))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (z, y, x) shape of an array on this grid."""
        return self.size[2], self.size[1], self.size[0]

    @classmethod
    def of(cls, image) -> Geometry:
        """The geometry of a 3D SimpleITK image (or of an ``ImageFileReader`` after ``ReadImageInformation``)."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image):
        """Give a SimpleITK image of this size this spacing, origin and direction; returns the image."""
        if tuple(image.GetSize()) != self.size:
            raise ConfigError(f"image size {tuple(image.GetSize())} does not match the geometry's {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image
