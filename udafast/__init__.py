"""udafast: unsupervised domain adaptation for semantic segmentation."""

__version__ = "0.1.0"

from udafast import ops  # noqa: E402,F401
