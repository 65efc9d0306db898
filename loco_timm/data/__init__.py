"""Data: datasets and sources as uint8 images, SimCLR's crops and augmentation.

* :mod:`.datasets`: Fashion-MNIST (the embedded default), CIFAR and STL-10 and every source below, with the samplers
  of exact resume;
* :mod:`.sources`: image sources through ``timm.data.create_dataset`` (folders, tars, torchvision, HF datasets,
  webdataset streams) and their loaders;
* :mod:`.crops`: the random resized crop on the whole decoded image, in the loader;
* :mod:`.augment`: batched SimCLR augmentation whose randomness does not depend on how samples are batched.
"""
