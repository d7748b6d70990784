"""SAM (segment-anything) in one place: ``build`` (variants, encoder, full Sam, tiny SAM), ``attention``
(decomposed relative positions, once), ``encoder`` (memory-bounded forward), ``memory`` (checks).
Every caller imports from these modules directly."""
