"""Class-conditional DDPM for CIFAR-10: core library and pipeline workflows."""

__version__ = "0.1.0"
