"""OCI registries: references (:mod:`.reference`), the distribution client
(:mod:`.registry`, with :mod:`.auth` and :mod:`.media`), the blob cache (:mod:`.cache`),
image config to Apptainer metadata (:mod:`.config`) and the pull pipeline (:mod:`.pull`).

Nothing here is imported by ``sifpy exec``: requests is loaded only by pull, build and
registry commands.
"""
