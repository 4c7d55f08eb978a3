"""Datasets (CIFAR-10, image folders and archives, synthetic shapes), the prepared-data format, and
device-resident seeded batches."""
