"""Conversion: a pretrained ViT into a Lipschitz-bounded model (:func:`robustvit.conversion.convert.convert`, public as
``robustvit.convert``), with its own settings (:mod:`~robustvit.conversion.config`), its choices of mixers, activations
and MLP forms (:mod:`~robustvit.conversion.choices`) and the metadata the converted model gives its library
(:mod:`~robustvit.conversion.metadata`). The package exports nothing itself: ``robustvit.convert`` is the function."""
