"""latentlab: a reproducible pipeline for unsupervised deep learning.

Importing the package does no work; every stage lives in a submodule as a typed
function that the DVC stages, the CLI and the Prefect flows call.
"""

__version__ = "0.1.0"
