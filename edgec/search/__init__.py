"""Search over pass parameters: the space each pass declares (:mod:`edgec.search.space`).

Kept import-light on purpose: every pass imports the declaration helpers from here, so nothing
heavier than :mod:`edgec.search.space` may be imported by this package's ``__init__``.
"""
