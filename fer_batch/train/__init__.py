"""Training side of fer-batch: datasets, augmentation, architectures, the training engine."""
