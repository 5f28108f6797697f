"""ovlfuse: the merged view of Docker overlay2 layers, served in userspace with FUSE."""

__version__ = "0.1.0"
