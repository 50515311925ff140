"""``aiolimits demo``: the main job, end to end, on one machine (semantics §10).

``provider.py`` is a simulated LLM API that enforces RPM and TPM; ``run.py`` fans calls out to it
through :mod:`aiolimits.integrations.httpx` and measures; ``timeline.py`` draws the PNG; ``cli.py``
ties them to the command line. It needs the ``demo`` extra (httpx, rich, matplotlib).
"""
