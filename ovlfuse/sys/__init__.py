"""System helpers: confined access to layer directories, and the mount table."""
