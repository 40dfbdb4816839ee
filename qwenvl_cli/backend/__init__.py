"""Where answers come from: a model loaded in this process (local) or a launched server (remote)."""
