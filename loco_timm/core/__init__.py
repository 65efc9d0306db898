"""The method: a timm backbone cut into stages, local units over them, their decoders and loss, one training step.

* :mod:`.stages`: :func:`~loco_timm.core.stages.split_stages` cuts any supported timm backbone into stages;
* :mod:`.units`: which stages each unit of end-to-end SimCLR, Greedy InfoMax and LoCo spans;
* :mod:`.decoders` and :mod:`.losses`: the local decoders (projection heads) and NT-Xent;
* :mod:`.learner`: :class:`~loco_timm.core.learner.LocalLearner`, the unit-by-unit schedule and recomputation,
  with :mod:`.gradients` (where each unit's gradient is) and :mod:`.sharing` (the paper's sharing ablation);
* :mod:`.factory`: the learner a recipe describes, for training, readout and export alike;
* :mod:`.memory`: the activation memory a step keeps, measured exactly.
"""
