"""Compatibility of model generations on your own face data (docs/compat.md).

Command line: ``python tools/compat_eval/compat_eval.py --data ROOT --models V1.pt V2.pt …``. Modules:
``data`` (face set, its embedding pass, image features, 1:1 pairs and 1:N split), ``protocol``
(exact 1:N search, the figures of a cell, the matrix, its verdicts and multi-generation figures),
``report`` (markdown, heatmap), ``backfill`` (backfill curves, flips).
"""
