"""Repository tools: code that maintains this repository or serves its tests and benchmarks, not part of the library.

* :mod:`.cards`: ``MODEL_CARD.md`` and the README's generated sections from ``hub_configs/`` and the study results;
* :mod:`.study_metrics`: a study's measured metrics written into the hub configs of the tags it trained;
* :mod:`.coverage`: which timm model families LoCo can train (``benchmarks/coverage.py``, ``tests/test_families.py``);
* :mod:`.memory`: the activation memory a step keeps, measured exactly (benchmarks and memory tests).
"""
