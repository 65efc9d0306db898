"""From a trained run to the Hugging Face Hub: :mod:`.export` writes a repository folder that timm loads (weights,
``config.json``, the model card of :mod:`.card`), :mod:`.publish` uploads it."""
