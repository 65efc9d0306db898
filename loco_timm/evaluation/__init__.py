"""Evaluation: what the learned features are worth, and the paper's comparisons.

* :mod:`.readout`: linear readout and kNN on frozen features of every stage, with reference rows;
* :mod:`.study`: the paper's arms and ablations over seeds (``loco-timm study``; the paper's ablation figures are
  data, ``paper_ablations.yaml``); :mod:`.trend`: the same study at several training budgets (``loco-timm trend``).
"""
