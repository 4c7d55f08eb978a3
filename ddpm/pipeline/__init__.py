"""The workflows the DVC stages and the CLI call: how a stage runs (entry), the file layout, resume state,
the classifier, fid_stats, train, sample and evaluate stages with what sample and evaluate share (the
trained model, the run files), and the benchmark."""
