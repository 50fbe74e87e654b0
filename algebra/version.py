"""The package's version, in a module of its own: `algebra/__init__` and the model card
read it, and importing the package itself would start its lazy attributes."""

__version__ = "0.1.0"
