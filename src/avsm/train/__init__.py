"""Training of the AVSM networks: data, augmentation, the two-stage loop (see :mod:`avsm.train.trainer`)."""
