"""The FUSE adapter: pyfuse3 requests to engine calls, and the daemon that mounts and serves."""
