"""taxonedge: hierarchical product classification on edge devices."""

__version__ = "0.1.0"
