"""Model families. Each family has one module; stages pick a family by name
through the registries in :mod:`latentlab.train` and :mod:`latentlab.evaluate`."""
