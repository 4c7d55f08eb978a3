"""The math and the network: schedules, Gaussian diffusion, samplers, the U-Net, EMA, checkpoints (and the
network rebuilt from one), the training step and batched generation. Knows nothing of DVC, MLflow,
TensorBoard or the pipeline's files, and raises plain errors that the workflows word for the user."""
