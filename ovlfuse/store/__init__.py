"""Store set-up: mount options, layer stores and container engines, resolved before anything mounts."""
