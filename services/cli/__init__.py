"""wisp-cli, one module per command group.

``main`` assembles the typer app from ``system`` (up, serve, submit, status, demo), ``prepare``
(models, data), ``bench``, ``controller`` (trace, controller), ``estimator`` (profile,
estimator) and ``sim``; each of those imports only ``common`` (errors, shared flags, settings,
prerequisite checks, printing) and the library, never ``main`` nor each other except ``sim`` ->
``bench`` (the sim-to-real check runs the benchmark's own code path). This file imports
nothing, so importing any of them never runs the others (no import circles).
"""
