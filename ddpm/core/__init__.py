"""The math and the network: schedules, Gaussian diffusion, samplers, the U-Net, EMA, checkpoints, the
training step and batched generation. Knows nothing of DVC, MLflow, TensorBoard or the pipeline's files."""
