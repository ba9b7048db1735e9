"""TCL (Text-grounded Contrastive Learning, CVPR 2023) in PyTorch for tclseg.

The model here is the numerical reference: the Rust runtime must reproduce what `reference.segment` computes.
"""

__version__ = "0.1.0"
