"""GPU kernels of flashkm_dist and their plain-torch twins (installed as ``flashkm_dist.kernels``)."""
from . import fixed_point, reference
from .fixed_point import FixedPointScale
from .reference import Partials

__all__ = ["fixed_point", "reference", "FixedPointScale", "Partials"]
