"""The demo as a package: the whole pipeline on synthetic data, on a CPU, ending with the comparison table.

``tools/run_demo.py`` is its command line; the switch and curve tools and the training benchmark use
the public pieces of these modules (docs/architecture.md, "The demo"):
``runner`` (:class:`~tools.demo.runner.Pipeline`: stages as subprocesses, one log each, timed,
skipped with ``--reuse``; the in-process evaluation of a model), ``commands`` (the training and
feature commands of each demo config), ``stages`` (the stages in order, from the options to
``results.json``), ``transforms`` (the gallery-transform rows and the cost of each upgrade path),
``backfill`` (backfill curves on the IJB-C-style images) and ``report`` (result rows, margins,
verdicts, the table and the plot).
"""
