"""Experiment tracking: MLflow and TensorBoard, run lineage, run comparison, resource metrics and the DVC
metric/plot files."""
