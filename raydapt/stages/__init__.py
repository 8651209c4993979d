"""Ray Data stages: callable classes for ``map_batches`` on actor pools; no recipe knowledge."""
