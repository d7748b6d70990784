"""Region-mask generators: an image in, an integer region map of its size out (see ``base``).

Each generator registers itself in ``dapseg.registry.MASK_GENERATORS`` from its own module; the
config section ``masks: {name, params}`` picks one, and the segmenter runs it once per image for the
heads and refiners that declare ``Need.REGION_MASKS``.
"""
