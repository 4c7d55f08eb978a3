"""Sample quality: class accuracy, Frechet distances, k-NN precision/recall, the evaluation classifier and
Inception FID/IS."""
