"""Training through Accelerate: ``loco-timm train`` (or ``accelerate launch -m loco_timm train``).

* :mod:`.train`: the training function, written once in a fixed order (set-up, resume, steps, checkpoint or stop,
  finish), and :func:`~.train.choose_strategy`;
* :mod:`.strategies`: the contract of a way of training (its batches, its step, its state to save) and its two
  data-parallel forms, over a random-access dataset and over a stream; :mod:`.stage_training` the third, stage
  parallelism, on :mod:`.stage_parallel` (a learner's stages on P processes, synchronous or pipelined) and
  :mod:`.placement` (where the stages go);
* :mod:`.factory`: the learner a recipe describes; :mod:`.optim`: the SimCLR recipe's optimiser and learning-rate
  schedule, from ``timm.optim``;
* :mod:`.checkpoint`: atomic, verified checkpoints; :mod:`.resume`: the newest intact one, checked and loaded;
  :mod:`.runlock`: one trainer per run folder, clean pre-emption; :mod:`.report`: loss logs, throughput, machine.
"""
