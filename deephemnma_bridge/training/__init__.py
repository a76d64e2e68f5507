"""The ResNet34 + MLP regressor: model, datasets, training loop, checkpoints."""
