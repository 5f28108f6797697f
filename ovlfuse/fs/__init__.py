"""The merge engine: everything the merged view does, without FUSE (raises OSError)."""
