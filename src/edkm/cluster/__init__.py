"""Clustering math: DKM, 1-D k-means, hard assignment, 16-bit helpers."""

from .dkm import dkm
from .kmeans import decode, hard_assign, kmeans1d
from .sixteen import cast_straight_through, unique16

__all__ = ["dkm", "kmeans1d", "hard_assign", "decode", "cast_straight_through", "unique16"]
