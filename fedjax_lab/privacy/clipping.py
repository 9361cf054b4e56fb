"""L2 clipping of a whole update pytree (one norm over every leaf), and its size.

The helpers live in :mod:`fedjax_lab.algorithms.tree_math` (compression, an
algorithm wrapper, clips too, and algorithms do not import the privacy
layer); they are re-exported here under their privacy-facing names.
"""

from __future__ import annotations

from fedjax_lab.algorithms.tree_math import PyTree
from fedjax_lab.algorithms.tree_math import clip_to_norm
from fedjax_lab.algorithms.tree_math import global_norm
from fedjax_lab.algorithms.tree_math import num_parameters

__all__ = ["PyTree", "clip_to_norm", "global_norm", "num_parameters"]
