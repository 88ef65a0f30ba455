"""The model contract, at the bottom of the stack: what a trained model *is*.

- :mod:`networks` (+ :mod:`custom_cnn`, :mod:`pretrained`): the architecture registry;
- :mod:`transforms`: the typed preprocessing spec and its deterministic MONAI transform;
- :mod:`calibrate`: logits → calibrated probability → decisions → type probabilities;
- :mod:`bundle`: weights + the three above, saved and loaded as one file.

Imports only ``bonefrac.config``, ``bonefrac.errors``, ``bonefrac.atomic`` and libraries.
"""
