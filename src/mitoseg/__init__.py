"""mitoseg: mitochondria segmentation in electron microscopy.

Importing the package is cheap and has no side effects; heavy dependencies
(TensorFlow, MLflow, BentoML) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
