"""Images in and out of an overlay2 store: import archives, export layers."""
