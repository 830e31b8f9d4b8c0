"""Training core: loss, optimizer, sharded train state and the jitted train step."""
