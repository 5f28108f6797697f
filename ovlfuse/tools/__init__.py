"""The tools around a mount: demo, diff, verify, layers, which."""
