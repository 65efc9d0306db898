"""Training through Accelerate: ``loco-timm train`` (or ``accelerate launch -m loco_timm train``).

* :mod:`.train`: the training function (data, learner, optimiser, the loop, checkpoints, exact resume);
* :mod:`.optim`: the SimCLR recipe's optimiser and learning-rate schedule, from ``timm.optim``;
* :mod:`.checkpoint`: atomic, verified checkpoints; :mod:`.runlock`: one trainer per run folder, clean pre-emption;
* :mod:`.stage_parallel` and :mod:`.stage_training`: a learner's stages on P processes (synchronous or pipelined),
  composed with data parallelism.
"""
