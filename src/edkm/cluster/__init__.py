"""Clustering math: DKM, 1-D k-means, hard assignment, 16-bit helpers (pure: imports nothing else of edkm)."""

from edkm.cluster.dkm import dkm_autograd
from edkm.cluster.kmeans import decode, hard_assign, kmeans1d
from edkm.cluster.sixteen import cast_straight_through, unique16

__all__ = ["dkm_autograd", "kmeans1d", "hard_assign", "decode", "cast_straight_through", "unique16"]
